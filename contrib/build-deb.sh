#!/usr/bin/env bash
# Builds the Debian package, target/debian/abproxy_VERSION-1_ARCH.deb, and
# prints its path on the last line of stdout. From any directory:
#
#   contrib/build-deb.sh                  # release profile (fat LTO, ~3 min)
#   ABPROXY_DEB_PROFILE=deb-test contrib/build-deb.sh   # faster, for tests
#
# Needs cargo-deb (`cargo install cargo-deb --locked`) and dpkg-dev (for
# dpkg-shlibdeps: the Depends line). Honours CARGO_TARGET_DIR; extra
# arguments go to `cargo deb` (e.g. --output DIR).
#
# 1. the binary, without the `demo` feature (no test lab in the product);
# 2. from it, into target/PROFILE/deb/: the man pages (gzipped), the bash,
#    zsh and fish completions, and contrib/abproxy.service with its Exec
#    lines on /usr/bin/abproxy (the contrib copy, for a hand install,
#    says /usr/local/bin);
# 3. `cargo deb --no-build` with those (Cargo.toml's [package.metadata.deb]).
set -euo pipefail
cd "$(dirname "$0")/.."

profile=${ABPROXY_DEB_PROFILE:-release}
if ! cargo deb --version >/dev/null 2>&1; then
    echo "build-deb.sh: cargo-deb is missing: cargo install cargo-deb --locked" >&2
    exit 2
fi

target_dir=$(cargo metadata --format-version 1 --no-deps --locked |
    sed -n 's/.*"target_directory":"\([^"]*\)".*/\1/p')
[ -n "$target_dir" ] || { echo "build-deb.sh: no target directory from cargo metadata" >&2; exit 1; }

cargo build --locked -p abproxy --bin abproxy --no-default-features --profile "$profile" >&2

out="$target_dir/$profile"
bin="$out/abproxy"
stage="$out/deb"
rm -rf "$stage"
mkdir -p "$stage/man" "$stage/completions"

"$bin" manpages "$stage/man"
gzip -9n "$stage"/man/*.1
"$bin" completions bash >"$stage/completions/abproxy.bash"
"$bin" completions zsh >"$stage/completions/_abproxy"
"$bin" completions fish >"$stage/completions/abproxy.fish"
sed 's|^\(Exec[A-Za-z]*=\)/usr/local/bin/abproxy |\1/usr/bin/abproxy |' \
    contrib/abproxy.service >"$stage/abproxy.service"
if grep -n '^Exec.*/usr/local/' "$stage/abproxy.service" >&2; then
    echo "build-deb.sh: an Exec line of the unit is not on /usr/bin/abproxy" >&2
    exit 1
fi

# cargo-deb reads "target/release/..." in the assets as $out/...
deb=$(cargo deb --locked -p abproxy --no-build --profile "$profile" "$@" | tail -n 1)
[ -f "$deb" ] || { echo "build-deb.sh: cargo deb did not name a package: $deb" >&2; exit 1; }
echo "$deb"
