//! The `openldap` driver with `olcDbNoSync: TRUE`: PREPARE writes the
//! database file to disk before ON answers (seen in the kernel's page flags:
//! slapd's NoSync commits leave dirty pages of `data.mdb` in the page cache,
//! and none are left once ON has answered), and fails ON, changing nothing,
//! when the proxy cannot open the file.

use std::fs::File;
use std::os::unix::fs::{FileExt, PermissionsExt};
use std::os::unix::io::AsRawFd;
use std::path::Path;
use std::process::Stdio;

use crate::support::*;
use abproxy::config::{BackendConfig, Config};
use abproxy::freeze::drivers::DriverKind;
use abproxy::freeze::Mode;
use testkit::{user_dn, SlapdOptions, ADMIN_DN, ADMIN_PW, CONFIG_ADMIN_DN};

const BIN: &str = env!("CARGO_BIN_EXE_abproxy");

/// Pages of `path` in the page cache, and how many of them are dirty
/// (written, not yet on disk): the kernel's view through
/// `/proc/self/pagemap` and `/proc/kpageflags` (root only). Only pages
/// already cached are looked at (`mincore`), so the sparse 4 GiB file is
/// not read.
fn page_cache_state(path: &Path) -> std::io::Result<(usize, usize)> {
    let file = File::open(path)?;
    let len = file.metadata()?.len() as usize;
    // SAFETY: sysconf has no preconditions.
    let page = unsafe { libc::sysconf(libc::_SC_PAGESIZE) } as usize;
    let pages = len.div_ceil(page);
    // SAFETY: a fresh read-only shared mapping of an open file, unmapped
    // below; only bytes of pages inside the file are read.
    let map = unsafe {
        libc::mmap(
            std::ptr::null_mut(),
            len,
            libc::PROT_READ,
            libc::MAP_SHARED,
            file.as_raw_fd(),
            0,
        )
    };
    if map == libc::MAP_FAILED {
        return Err(std::io::Error::last_os_error());
    }
    let result = (|| {
        let mut cached = vec![0u8; pages];
        // SAFETY: `cached` has one byte per page of the mapping.
        if unsafe { libc::mincore(map, len, cached.as_mut_ptr()) } != 0 {
            return Err(std::io::Error::last_os_error());
        }
        let pagemap = File::open("/proc/self/pagemap")?;
        let kpageflags = File::open("/proc/kpageflags")?;
        let (mut resident, mut dirty) = (0, 0);
        for (i, c) in cached.iter().enumerate() {
            if c & 1 == 0 {
                continue;
            }
            let addr = map as usize + i * page;
            // Map the cached page into this process (no I/O) to learn its
            // frame number.
            // SAFETY: `addr` is inside the mapping, within the file.
            unsafe { std::ptr::read_volatile(addr as *const u8) };
            let mut e = [0u8; 8];
            pagemap.read_exact_at(&mut e, (addr / page * 8) as u64)?;
            let e = u64::from_le_bytes(e);
            if e >> 63 == 0 {
                continue; // evicted meanwhile
            }
            let pfn = e & ((1 << 55) - 1);
            if pfn == 0 {
                return Err(std::io::Error::other(
                    "pagemap shows no frame numbers (needs CAP_SYS_ADMIN)",
                ));
            }
            let mut f = [0u8; 8];
            kpageflags.read_exact_at(&mut f, pfn * 8)?;
            resident += 1;
            const KPF_DIRTY: u64 = 1 << 4;
            if u64::from_le_bytes(f) & KPF_DIRTY != 0 {
                dirty += 1;
            }
        }
        Ok((resident, dirty))
    })();
    // SAFETY: the mapping made above.
    unsafe { libc::munmap(map, len) };
    result
}

/// `abproxy ARGS --url URL --bind-dn cn=admin,...` with the password in the
/// environment.
async fn abproxy(url: &str, args: &[&str]) -> ToolOutput {
    let out = tokio::process::Command::new(BIN)
        .args(args)
        .args(["--url", url, "--bind-dn", ADMIN_DN])
        .env("ABPROXY_PASSWORD", ADMIN_PW)
        .stdin(Stdio::null())
        .output()
        .await
        .unwrap();
    ToolOutput::from(out)
}

/// LDIF adding `n` entries under dc=example,dc=org.
fn entries(prefix: &str, n: usize) -> String {
    (0..n)
        .map(|i| {
            format!(
                "dn: cn={prefix}{i},dc=example,dc=org\nobjectClass: person\ncn: {prefix}{i}\nsn: {prefix}\ndescription: {}\n\n",
                "x".repeat(200)
            )
        })
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn prepare_writes_a_nosync_database_to_disk() {
    if !Path::new("/proc/kpageflags").exists() || unsafe { libc::geteuid() } != 0 {
        testkit::skip("needs root and /proc/kpageflags to see dirty pages");
        return;
    }
    let lab = Lab::with(
        SlapdOptions {
            nosync: true,
            ..Default::default()
        },
        |_| {},
    )
    .await;
    let mut config = Config {
        listen: vec!["ldap://127.0.0.1:0".into()],
        upstream: lab.direct(),
        ..Config::default()
    };
    config.freeze.allowed = vec![ADMIN_DN.into()];
    config.freeze.root_dns = vec![ADMIN_DN.into()];
    let mut example = BackendConfig::new("dc=example,dc=org", Mode::Readonly);
    example.driver = DriverKind::Openldap;
    example.config_url = Some(lab.slapd.ldapi_url());
    config.backends = vec![
        example,
        BackendConfig::new("dc=other,dc=org", Mode::Readonly),
    ];
    let proxy = abproxy::ProxyHandle::spawn(config).await.unwrap();
    let data = lab.slapd.dir().join("db-example").join("data.mdb");

    // NoSync commits: their pages are written to the page cache, not to
    // disk. The kernel writes dirty pages back by itself after 30 s, or
    // sooner when much of memory is dirty (other builds on the machine): if
    // it did, add more.
    let mut round = 0;
    let (resident, dirty) = loop {
        let out = ldap_tool(
            "ldapadd",
            &["-Q", "-Y", "EXTERNAL", "-H", &lab.slapd.ldapi_url()],
            Some(&entries(&format!("nosync{round}-"), 300)),
        )
        .await;
        assert_eq!(out.code, Some(0), "{out:?}");
        let (resident, dirty) = page_cache_state(&data).unwrap();
        round += 1;
        if dirty > 0 || round == 5 {
            break (resident, dirty);
        }
    };
    assert!(
        dirty > 0,
        "precondition: slapd's NoSync commits left dirty pages ({resident} cached)"
    );

    let on = abproxy(&proxy.url(), &["on", "--backend", "dc=example,dc=org"]).await;
    assert_eq!(on.code, Some(0), "{on:?}");
    let (resident, dirty) = page_cache_state(&data).unwrap();
    assert!(resident > 0);
    assert_eq!(
        dirty, 0,
        "ON answered with {dirty} of {resident} cached pages of data.mdb not on disk"
    );
    assert_eq!(
        olc_read_only(&lab.slapd.ldapi_url()).await,
        "olcReadOnly: TRUE"
    );

    let off = abproxy(&proxy.url(), &["off"]).await;
    assert_eq!(off.code, Some(0), "{off:?}");
    assert_eq!(olc_read_only(&lab.slapd.ldapi_url()).await, "");
    proxy.shutdown().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn nosync_prepare_fails_cleanly_when_the_proxy_cannot_open_the_database() {
    if unsafe { libc::geteuid() } != 0 {
        testkit::skip("needs root to run the proxy as another user");
        return;
    }
    let lab = Lab::with(
        SlapdOptions {
            nosync: true,
            ..Default::default()
        },
        |_| {},
    )
    .await;
    // The proxy runs as nobody: it reaches cn=config over TCP with the
    // config admin's password, but slapd's directory (0700, root) is closed
    // to it.
    let etc = tempfile::tempdir().unwrap();
    std::fs::set_permissions(etc.path(), std::fs::Permissions::from_mode(0o755)).unwrap();
    let pw = etc.path().join("config.pw");
    std::fs::write(&pw, format!("{ADMIN_PW}\n")).unwrap();
    std::fs::set_permissions(&pw, std::fs::Permissions::from_mode(0o644)).unwrap();
    let port = process::free_port();
    let url = format!("ldap://127.0.0.1:{port}");
    let toml = etc.path().join("abproxy.toml");
    std::fs::write(
        &toml,
        format!(
            r#"listen = ["{url}"]
upstream = "{upstream}"
[freeze]
allowed = ["{ADMIN_DN}"]
root_dns = ["{ADMIN_DN}"]
[[backends]]
suffix = "dc=example,dc=org"
driver = "openldap"
config_url = "{upstream}"
config_bind_dn = "{CONFIG_ADMIN_DN}"
config_password_file = "{pw}"
"#,
            upstream = lab.direct(),
            pw = pw.display(),
        ),
    )
    .unwrap();
    std::fs::set_permissions(&toml, std::fs::Permissions::from_mode(0o644)).unwrap();
    use std::os::unix::process::CommandExt;
    let mut serve = std::process::Command::new(BIN);
    serve
        .args(["serve", "--config", toml.to_str().unwrap()])
        .uid(65534)
        .gid(65534)
        .env("ABPROXY_LOG", "warn")
        .stdout(Stdio::null())
        .stderr(Stdio::null());
    let serve = KillOnDrop(serve.spawn().unwrap());
    let addr = format!("127.0.0.1:{port}");
    wait_until("the proxy running as nobody listens", 20, || {
        std::net::TcpStream::connect(&addr).is_ok()
    })
    .await;

    let on = abproxy(&url, &["on"]).await;
    assert_eq!(on.code, Some(6), "ON fails: {on:?}");
    assert!(
        on.stderr
            .contains("commits without fsync (olcDbNoSync: TRUE)")
            && on.stderr.contains("data.mdb to fsync it")
            && on.stderr.contains("Permission denied"),
        "the reason and what to do: {on:?}"
    );
    // Nothing was changed or left frozen.
    assert_eq!(
        olc_read_only(&lab.slapd.ldapi_url()).await,
        "",
        "never set read-only"
    );
    let status = abproxy(&url, &["status", "--json"]).await;
    assert_eq!(status.code, Some(0), "{status:?}");
    let json: serde_json::Value = serde_json::from_str(&status.stdout).unwrap();
    assert_eq!(json["state"], "thawed", "{json}");
    let ldif = format!(
        "dn: {}\nchangetype: modify\nreplace: description\ndescription: after the failed ON\n",
        user_dn(3)
    );
    let out = ldap_tool(
        "ldapmodify",
        &["-x", "-H", &url, "-D", ADMIN_DN, "-w", ADMIN_PW],
        Some(&ldif),
    )
    .await;
    assert_eq!(out.code, Some(0), "writes go through: {out:?}");
    drop(serve);
}

/// Kills the proxy if the test fails half-way.
struct KillOnDrop(std::process::Child);

impl Drop for KillOnDrop {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}
