#!/usr/bin/env bash
# Installs the autoglm C library to a prefix: PREFIX/lib/libautoglm.so and libautoglm.a,
# PREFIX/include/autoglm.h and PREFIX/lib/pkgconfig/autoglm.pc (from autoglm.pc.in, with the
# static library's native dependencies in Libs.private), after `cargo build --release -p
# autoglm-capi` (CARGO_TARGET_DIR is honoured). Then:
#
#   PKG_CONFIG_PATH=PREFIX/lib/pkgconfig cc app.c $(pkg-config --cflags --libs autoglm)
#   cc app.c $(pkg-config --cflags autoglm) PREFIX/lib/libautoglm.a $(pkg-config --static --libs-only-l autoglm | sed 's/-lautoglm//')
#
# Usage: autoglm-capi/install.sh --prefix DIR [--libdir DIR] [--includedir DIR] [--destdir DIR]
#        [--no-build]
#   --libdir, --includedir  default PREFIX/lib and PREFIX/include (relative ones are under PREFIX)
#   --destdir               stage under DESTDIR (packaging); the .pc file still names PREFIX
#   --no-build              install what target/release already holds
set -euo pipefail
cd "$(dirname "$0")/.."

prefix="" libdir="" includedir="" destdir="" build=1
usage() { sed -n '2,16p' "$0" | sed 's/^# \{0,1\}//'; exit "${1:-0}"; }
while (($#)); do
  case $1 in
    --prefix) prefix=${2:?--prefix needs a directory}; shift 2 ;;
    --prefix=*) prefix=${1#*=}; shift ;;
    --libdir) libdir=${2:?}; shift 2 ;;
    --libdir=*) libdir=${1#*=}; shift ;;
    --includedir) includedir=${2:?}; shift 2 ;;
    --includedir=*) includedir=${1#*=}; shift ;;
    --destdir) destdir=${2:?}; shift 2 ;;
    --destdir=*) destdir=${1#*=}; shift ;;
    --no-build) build=0; shift ;;
    -h | --help) usage 0 ;;
    *) echo "install.sh: unknown argument $1" >&2; usage 2 >&2 ;;
  esac
done
[ -n "$prefix" ] || { echo "install.sh: --prefix is required" >&2; usage 2 >&2; }
case $prefix in /*) ;; *) prefix=$PWD/$prefix ;; esac
prefix=${prefix%/}
case $libdir in "") libdir=$prefix/lib ;; /*) ;; *) libdir=$prefix/$libdir ;; esac
case $includedir in "") includedir=$prefix/include ;; /*) ;; *) includedir=$prefix/$includedir ;; esac

meta=$(cargo metadata --format-version 1 --no-deps)
field() { python3 -c "import json,sys; m=json.loads(sys.argv[1]); print($1)" "$meta"; }
target_dir=$(field 'm["target_directory"]')
version=$(field 'next(p["version"] for p in m["packages"] if p["name"] == "autoglm-capi")')
built=$target_dir/release

if ((build)); then
  cargo build --release -p autoglm-capi
fi
# rustc prints the static library's native dependencies when it links it; cargo replays the
# note when the build is fresh.
native=$(cargo rustc -p autoglm-capi --release --crate-type staticlib -- --print native-static-libs 2>&1 |
  sed -n 's/.*native-static-libs: //p' | tail -1)
[ -n "$native" ] || { echo "install.sh: rustc did not print native-static-libs" >&2; exit 1; }
for f in libautoglm.so libautoglm.a; do
  [ -f "$built/$f" ] || { echo "install.sh: $built/$f is missing (run without --no-build)" >&2; exit 1; }
done

# ${prefix} stays symbolic in the .pc file when the directories are under it.
rel() { case $1 in "$prefix"/*) echo "\${prefix}${1#"$prefix"}" ;; *) echo "$1" ;; esac; }
install -d "$destdir$libdir/pkgconfig" "$destdir$includedir"
install -m 755 "$built/libautoglm.so" "$destdir$libdir/libautoglm.so"
install -m 644 "$built/libautoglm.a" "$destdir$libdir/libautoglm.a"
install -m 644 autoglm-capi/include/autoglm.h "$destdir$includedir/autoglm.h"
sed -e "s|@prefix@|$prefix|" -e "s|@libdir@|$(rel "$libdir")|" \
  -e "s|@includedir@|$(rel "$includedir")|" -e "s|@version@|$version|" \
  -e "s|@libs_private@|$native|" -e '/^#/d' \
  autoglm-capi/autoglm.pc.in >"$destdir$libdir/pkgconfig/autoglm.pc"
chmod 644 "$destdir$libdir/pkgconfig/autoglm.pc"
echo "installed autoglm $version to $destdir$prefix:"
ls -l "$destdir$libdir/libautoglm.so" "$destdir$libdir/libautoglm.a" \
  "$destdir$includedir/autoglm.h" "$destdir$libdir/pkgconfig/autoglm.pc"
