//! A backup's `manifest.json`: what the backup holds and how it was taken,
//! and the SHA-256 of every file, so that `abproxy verify` can check it
//! without anything else.

use std::fmt::Write as _;
use std::io::Read;
use std::path::Path;

use serde::{Deserialize, Serialize};
use sha2::{Digest as _, Sha256};

/// The manifest's format version.
pub const FORMAT_VERSION: u32 = 1;

/// `manifest.json`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Manifest {
    pub format_version: u32,
    /// UTC time of the start and the freeze id: `20261203T172711Z-f3`.
    pub backup_id: String,
    pub abproxy_version: String,
    pub proxy_url: String,
    pub server: ServerInfo,
    pub started: String,
    pub ended: String,
    pub freeze: FreezeInfo,
    pub backends: Vec<BackendRecord>,
    /// Every other file of the backup, with its size and SHA-256.
    pub files: Vec<FileRecord>,
    /// Every proxy frozen for the backup with its freeze, in the order
    /// given (the first is `proxy_url`, the one the export read through).
    /// Absent (empty) in manifests written before it.
    #[serde(default)]
    pub proxies: Vec<ProxyFreeze>,
    /// An incremental backup (`backup --incremental`): the proxy's journal
    /// from its base backup's cut to this backup's, instead of the data.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub incremental: Option<Incremental>,
}

/// What an incremental backup holds, and what it is based on.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Incremental {
    /// The base backup (a full backup, or the previous incremental).
    pub base_backup_id: String,
    /// SHA-256 of the base's `manifest.json`: the chain is checked by it.
    pub base_manifest_sha256: String,
    /// The base's journal cut: the writes after it are this backup's.
    pub base_cut: u64,
    /// The journal segments copied (files of this backup), in order; the
    /// last ends with this backup's cut (`freeze.journal_cut`).
    pub segments: Vec<String>,
    /// Writes that succeeded between the two cuts.
    pub writes: u64,
}

impl Manifest {
    /// `DIR/manifest.json`, parsed (the format version is not checked
    /// here: `abproxy verify` does that and says what it means). The error
    /// names the file.
    pub fn read(dir: &Path) -> Result<Manifest, String> {
        let path = dir.join(MANIFEST);
        let text =
            std::fs::read_to_string(&path).map_err(|e| format!("{}: {e}", path.display()))?;
        serde_json::from_str(&text).map_err(|e| format!("{}: {e}", path.display()))
    }
}

/// One proxy a backup froze, and its freeze.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ProxyFreeze {
    /// The proxy's URL, as given.
    pub url: String,
    /// Its freeze's id (`None`: the proxy did not say).
    pub freeze_id: Option<u64>,
    /// Its answer to ON.
    pub message: String,
    /// Its answer to OFF.
    #[serde(default)]
    pub released: String,
    /// Its journal's cut for the freeze (from its answer to ON), when it
    /// keeps a journal.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub journal_cut: Option<u64>,
}

/// The LDAP server, from its root DSE (read through the proxy).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct ServerInfo {
    pub vendor_name: Option<String>,
    pub vendor_version: Option<String>,
}

impl std::fmt::Display for ServerInfo {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match (&self.vendor_name, &self.vendor_version) {
            (Some(n), Some(v)) => write!(f, "{n} {v}"),
            (Some(n), None) => f.write_str(n),
            (None, Some(v)) => write!(f, "version {v} (no vendorName)"),
            (None, None) => f.write_str("no vendorName or vendorVersion in the root DSE"),
        }
    }
}

/// The freeze the backup was taken under.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct FreezeInfo {
    pub id: Option<u64>,
    pub drained_ms: Option<u64>,
    /// When ON was sent: the proxy holds writes from its drain on, so
    /// writes may wait from this time (absent in manifests before it).
    #[serde(default)]
    pub requested: String,
    /// When ON had succeeded everywhere.
    pub frozen_from: String,
    pub frozen_to: String,
    /// The proxy's answer to ON.
    pub message: String,
    /// The proxy's answer to OFF: how long it was frozen, how many held
    /// requests it resumed (absent in manifests before it).
    #[serde(default)]
    pub released: String,
    /// The requests the proxy held during the freeze and resumed at OFF,
    /// from its answer.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub requests_resumed: Option<u64>,
    /// The sequence number of the proxy's journal cut for this freeze
    /// (from its answer to ON): the backup holds every write of the journal
    /// before it and none after it (`abproxy journal replay --after DIR`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub journal_cut: Option<u64>,
}

/// One backend exported.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct BackendRecord {
    pub suffix: String,
    /// `readonly` or `stop`.
    pub mode: String,
    pub method: String,
    pub entries: u64,
    /// The suffix entry's `contextCSN` values, read during the freeze.
    pub context_csn: Vec<String>,
    /// [`crate::backup::Digest`] of the entries, 64 hex digits.
    pub digest: String,
    pub file: String,
    /// The commands run to read the data (`slapcat`, `cp`), as a shell
    /// would show them.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub commands: Vec<String>,
    /// The suffix entry's `entryUUID` (389 DS: `nsUniqueId` where it has
    /// none) as the server behind the proxy served it during the freeze:
    /// which database this is (a copy or a
    /// replica keeps it; the methods that read local files check that they
    /// read this one).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub suffix_uuid: Option<String>,
    /// 389 DS: the suffix's replica update vector (`nsds50ruv` values of
    /// its RUV entry) read during the freeze, when it is replicated.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub ruv: Vec<String>,
    /// 389 DS: the backend's highest USN (`lastusn;BACKEND` of the root
    /// DSE) read during the freeze, with the USN plugin on.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_usn: Option<String>,
    /// `389` method: the backend in 389 DS's own archive.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ds389: Option<Ds389Archive>,
}

/// A backend in a 389 DS archive (`--method 389`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Ds389Archive {
    /// The 389 DS backend (`userRoot`); its entries are
    /// `<backend in lower case>/id2entry.db` in the archive.
    pub backend: String,
    /// Where the server wrote the archive (removed once it is in the
    /// backup).
    pub archive_dir: String,
}

/// A file of the backup.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct FileRecord {
    pub name: String,
    pub size: u64,
    pub sha256: String,
}

/// The manifest's file name in a backup directory.
pub const MANIFEST: &str = "manifest.json";
/// Every file's SHA-256, `manifest.json`'s too, in `sha256sum`'s format
/// (`sha256sum -c SHA256SUMS` checks a backup without abproxy).
pub const SHA256SUMS: &str = "SHA256SUMS";

/// Renames `from` to `to` unless `to` exists (`renameat2` with
/// `RENAME_NOREPLACE`: no window in which another process's `to` is
/// replaced). Where the file system cannot do that (`EINVAL`), a check and
/// a plain rename.
pub fn rename_noreplace(from: &Path, to: &Path) -> std::io::Result<()> {
    use std::ffi::CString;
    use std::os::unix::ffi::OsStrExt as _;
    let c = |p: &Path| {
        CString::new(p.as_os_str().as_bytes())
            .map_err(|_| std::io::Error::new(std::io::ErrorKind::InvalidInput, "NUL in a path"))
    };
    let (f, t) = (c(from)?, c(to)?);
    // SAFETY: two NUL-terminated paths, relative to the working directory.
    let r = unsafe {
        libc::renameat2(
            libc::AT_FDCWD,
            f.as_ptr(),
            libc::AT_FDCWD,
            t.as_ptr(),
            libc::RENAME_NOREPLACE,
        )
    };
    if r == 0 {
        return Ok(());
    }
    let e = std::io::Error::last_os_error();
    if e.raw_os_error() != Some(libc::EINVAL) {
        return Err(e);
    }
    if std::fs::symlink_metadata(to).is_ok() {
        return Err(std::io::Error::from(std::io::ErrorKind::AlreadyExists));
    }
    std::fs::rename(from, to)
}

/// A file's size and SHA-256 (hex).
pub fn file_sha256(path: &Path) -> std::io::Result<(u64, String)> {
    let mut f = std::fs::File::open(path)?;
    let mut h = Sha256::new();
    let mut buf = vec![0u8; 64 << 10];
    let mut size = 0u64;
    loop {
        let n = f.read(&mut buf)?;
        if n == 0 {
            break;
        }
        size += n as u64;
        h.update(&buf[..n]);
    }
    let mut hex = String::with_capacity(64);
    for b in h.finalize() {
        let _ = write!(hex, "{b:02x}");
    }
    Ok((size, hex))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backup_rename_never_replaces() {
        let d = tempfile::tempdir().unwrap();
        let (a, b) = (d.path().join("a"), d.path().join("b"));
        std::fs::create_dir(&a).unwrap();
        std::fs::create_dir(&b).unwrap();
        std::fs::write(b.join("keep"), "x").unwrap();
        let e = rename_noreplace(&a, &b).unwrap_err();
        assert_eq!(e.kind(), std::io::ErrorKind::AlreadyExists);
        assert!(a.exists() && b.join("keep").exists());
        let c = d.path().join("c");
        rename_noreplace(&a, &c).unwrap();
        assert!(!a.exists() && c.is_dir());
    }
}
