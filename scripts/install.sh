#!/usr/bin/env bash
# Installs ckpt: the command, its agent and its restorer, the man pages,
# the bash, zsh and fish completions, and the API for programs that know
# they are checkpointed (C header and library, Python module).
#
#   scripts/install.sh [--no-build] [PREFIX]     install (PREFIX: /usr/local as root, else ~/.local)
#   scripts/install.sh --uninstall [PREFIX]      remove what an install put there
#
# Layout (what `ckpt` finds by itself, no environment variable needed):
#   PREFIX/bin/ckpt
#   PREFIX/lib/ckpt/libckpt_preload.so     the agent, loaded into every launched program
#   PREFIX/lib/ckpt/ckpt-restorer          the restorer every restarted process becomes
#   PREFIX/share/man/man1/ckpt.1, ckpt-SUBCOMMAND.1
#   PREFIX/share/bash-completion/completions/ckpt
#   PREFIX/share/zsh/site-functions/_ckpt
#   PREFIX/share/fish/vendor_completions.d/ckpt.fish
#   PREFIX/include/ckpt.h, PREFIX/lib/libckpt.so   the C API (cc ... -lckpt)
#   PREFIX/lib/ckpt/python/ckpt.py                the Python module (PYTHONPATH)
#
# libckpt.so is compiled here with $CC (default cc) from libckpt/ckpt.c,
# with --no-build too; without a C compiler the C API and the Python module
# are left out, with a warning.
# Files are installed 0755 (0644 for pages, completions, header, module), owned by the
# installing user, never writable by anyone else: the agent runs inside
# every program ckpt launches. --no-build installs what `cargo build
# --release` already built (in $CARGO_TARGET_DIR or target/), e.g. for an
# account without a Rust toolchain.
set -euo pipefail

usage() { echo "usage: $0 [--no-build] [--uninstall] [PREFIX]" >&2; exit 2; }

build=1 uninstall=0 prefix=
while [ $# -gt 0 ]; do
  case "$1" in
    --no-build) build=0 ;;
    --uninstall) uninstall=1 ;;
    -h|--help) sed -n '2,28p' "$0" | sed 's/^# \{0,1\}//'; exit 0 ;;
    -*) echo "$0: unknown option $1" >&2; usage ;;
    *) [ -z "$prefix" ] || usage; prefix=$1 ;;
  esac
  shift
done
if [ -z "$prefix" ]; then
  if [ "$(id -u)" -eq 0 ]; then prefix=/usr/local; else prefix=${HOME:?HOME is not set: name a PREFIX}/.local; fi
fi
case "$prefix" in /*) ;; *) prefix=$PWD/$prefix ;; esac

bin=$prefix/bin
lib=$prefix/lib/ckpt
man1=$prefix/share/man/man1
bashc=$prefix/share/bash-completion/completions
zshc=$prefix/share/zsh/site-functions
fishc=$prefix/share/fish/vendor_completions.d
inc=$prefix/include
pylib=$lib/python

if [ "$uninstall" -eq 1 ]; then
  # The man pages an install wrote are named by its ckpt: ckpt.1 and ckpt-*.1.
  rm -f "$bin/ckpt" "$lib/libckpt_preload.so" "$lib/ckpt-restorer" \
        "$man1"/ckpt.1 "$man1"/ckpt-*.1 "$bashc/ckpt" "$zshc/_ckpt" "$fishc/ckpt.fish" \
        "$inc/ckpt.h" "$prefix/lib/libckpt.so" "$pylib/ckpt.py"
  rm -rf "$pylib/__pycache__"
  rmdir "$pylib" 2>/dev/null || true
  rmdir "$lib" 2>/dev/null || true
  echo "ckpt removed from $prefix"
  exit 0
fi

root=$(cd "$(dirname "$0")/.." && pwd)
target=${CARGO_TARGET_DIR:-$root/target}
case "$target" in /*) ;; *) target=$root/$target ;; esac
out=$target/release
if [ "$build" -eq 1 ]; then
  command -v cargo >/dev/null || { echo "$0: cargo is not installed: install Rust (1.85+), or build elsewhere and use --no-build" >&2; exit 1; }
  (cd "$root" && cargo build --release -p ckpt-cli -p ckpt-preload -p ckpt-restorer)
fi
for f in ckpt libckpt_preload.so ckpt-restorer; do
  [ -f "$out/$f" ] || { echo "$0: $out/$f is missing: build it (cargo build --release) or drop --no-build" >&2; exit 1; }
done

# Nothing installed may be writable by group or others, whatever the umask.
umask 022
install -d -m 0755 "$bin" "$lib" "$man1" "$bashc" "$zshc" "$fishc"
# Each file goes in under a temporary name then is renamed: a program
# running the old agent or restorer keeps its (unchanged) mapping.
put() { # SRC DEST MODE
  install -m "$3" "$1" "$2.new.$$" && mv -f "$2.new.$$" "$2"
}
put "$out/libckpt_preload.so" "$lib/libckpt_preload.so" 0755
put "$out/ckpt-restorer" "$lib/ckpt-restorer" 0755
put "$out/ckpt" "$bin/ckpt" 0755

# Man pages and completions come from the installed command's own definition.
gen=$(mktemp -d)
trap 'rm -rf "$gen"' EXIT
"$bin/ckpt" generate man "$gen"
rm -f "$man1"/ckpt.1 "$man1"/ckpt-*.1
for page in "$gen"/*.1; do put "$page" "$man1/$(basename "$page")" 0644; done
"$bin/ckpt" generate completion bash > "$gen/bash" && put "$gen/bash" "$bashc/ckpt" 0644
"$bin/ckpt" generate completion zsh > "$gen/zsh" && put "$gen/zsh" "$zshc/_ckpt" 0644
"$bin/ckpt" generate completion fish > "$gen/fish" && put "$gen/fish" "$fishc/ckpt.fish" 0644

# The API for programs that know they are checkpointed: libckpt.so finds
# the agent at run time and does nothing without it.
cc=${CC:-cc}
api=
if command -v "$cc" >/dev/null; then
  "$cc" -O2 -fPIC -shared -Wall -o "$gen/libckpt.so" "$root/libckpt/ckpt.c" -ldl
  install -d -m 0755 "$inc" "$pylib"
  put "$gen/libckpt.so" "$prefix/lib/libckpt.so" 0755
  put "$root/libckpt/ckpt.h" "$inc/ckpt.h" 0644
  put "$root/python/ckpt.py" "$pylib/ckpt.py" 0644
  # The loader's cache knows the new library (root, system prefixes).
  if [ "$(id -u)" -eq 0 ] && command -v ldconfig >/dev/null; then ldconfig 2>/dev/null || true; fi
  api=", C API in $inc and $prefix/lib, Python module in $pylib"
else
  echo "warning: no C compiler ($cc): the C API (ckpt.h, libckpt.so) and the Python module are not installed; install gcc and run this again" >&2
fi

echo "ckpt installed in $prefix: $bin/ckpt, agent and restorer in $lib, man pages in $man1$api"
case ":$PATH:" in *":$bin:"*) ;; *) echo "note: $bin is not in PATH; add it (export PATH=\"$bin:\$PATH\")" ;; esac
