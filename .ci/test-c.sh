#!/usr/bin/env bash
# C and C++ checks of the autoglm C API (autoglm-capi): builds libautoglm.so and libautoglm.a,
# compiles examples/c/generate.c (C99), examples/cpp/generate.cpp (C++17) and
# autoglm-capi/tests/c/errors.c against each with warnings as errors, checks the greedy token ids
# they print against both fixtures, runs the error-path program, and runs the C programs under
# valgrind (no definite leaks, no memory errors), the C++ example too.
#
# Run from anywhere on a fresh Debian/Ubuntu machine with a Rust toolchain; installs a C/C++
# compiler, valgrind and pkg-config with apt-get when they are missing.
set -euo pipefail
cd "$(dirname "$0")/.."
root=$PWD

step() { printf '\n== %s\n' "$*"; }
die() { echo "test-c: $*" >&2; exit 1; }

step "tools"
missing=()
command -v cc >/dev/null 2>&1 && command -v c++ >/dev/null 2>&1 || missing+=(build-essential)
command -v valgrind >/dev/null 2>&1 || missing+=(valgrind)
command -v pkg-config >/dev/null 2>&1 || missing+=(pkg-config)
if ((${#missing[@]})); then
  sudo=""
  [ "$(id -u)" -eq 0 ] || sudo=sudo
  $sudo apt-get update -qq
  $sudo apt-get install -y -qq "${missing[@]}"
fi
command -v python3 >/dev/null 2>&1 || die "python3 is needed to read the fixtures' expected.json"
cargo --version
cc --version | head -1
valgrind --version

meta=$(cargo metadata --format-version 1 --no-deps)
target_dir=$(python3 -c 'import json,sys; print(json.loads(sys.argv[1])["target_directory"])' "$meta")
version=$(python3 -c 'import json,sys; print(next(p["version"] for p in json.loads(sys.argv[1])["packages"] if p["name"] == "autoglm-capi"))' "$meta")
libdir=$target_dir/release
build=$target_dir/c-api-tests
mkdir -p "$build/pkgconfig"

step "native libraries the static library needs"
# rustc prints them when it links a staticlib; cargo replays the note when the build is fresh.
native=$(cargo rustc -p autoglm-capi --release --crate-type staticlib -- --print native-static-libs 2>&1 |
  sed -n 's/.*native-static-libs: //p' | tail -1)
[ -n "$native" ] || die "rustc did not print native-static-libs"
echo "$native"

step "cargo build --release -p autoglm-capi"
cargo build --release -p autoglm-capi
ls -l "$libdir/libautoglm.so" "$libdir/libautoglm.a"

step "pkg-config file (autoglm-capi/autoglm.pc.in, prefix = this checkout)"
sed -e "s|@prefix@|$root|" -e "s|@libdir@|$libdir|" -e "s|@includedir@|\${prefix}/autoglm-capi/include|" \
  -e "s|@version@|$version|" -e "s|@libs_private@|$native|" \
  autoglm-capi/autoglm.pc.in >"$build/pkgconfig/autoglm.pc"
export PKG_CONFIG_PATH=$build/pkgconfig
cflags=$(pkg-config --cflags autoglm)
shared_libs=$(pkg-config --libs autoglm)
# The static archive by path (-lautoglm would pick the .so next to it) plus Libs.private.
static_libs=$(pkg-config --static --libs autoglm | sed "s|-lautoglm|$libdir/libautoglm.a|")
echo "cflags: $cflags"
echo "shared: $shared_libs"
echo "static: $static_libs"

step "compile (warnings are errors)"
C_FLAGS=(-std=c99 -Wall -Wextra -Werror -pedantic -g -O1)
CXX_FLAGS=(-std=c++17 -Wall -Wextra -Werror -pedantic -g -O1)
compile() { # compiler flags-array-name source output link-mode
  local compiler=$1 flags=$2[@] src=$3 out=$4 mode=$5 libs
  if [ "$mode" = shared ]; then libs="$shared_libs -Wl,-rpath,$libdir"; else libs=$static_libs; fi
  # shellcheck disable=SC2086
  (set -x; $compiler "${!flags}" $cflags "$src" -o "$build/$out" $libs)
}
for mode in shared static; do
  compile cc C_FLAGS examples/c/generate.c "generate-c-$mode" $mode
  compile c++ CXX_FLAGS examples/cpp/generate.cpp "generate-cpp-$mode" $mode
  compile cc C_FLAGS autoglm-capi/tests/c/errors.c "errors-$mode" $mode
done
for exe in generate-c-static generate-cpp-static errors-static; do
  if ldd "$build/$exe" | grep -q libautoglm; then die "$exe links libautoglm.so"; fi
done
ldd "$build/generate-c-shared" | grep libautoglm

step "greedy token ids against the fixtures (case 0)"
field() { python3 -c 'import json,sys; c=json.load(open(sys.argv[1]))["cases"][0][sys.argv[2]]; print(" ".join(map(str,c)) if sys.argv[3]=="args" else c)' "$1/expected.json" "$2" "$3"; }
for fixture in glm4-tiny glm-tiny-bf16; do
  dir=tests/fixtures/$fixture
  want=$(field "$dir" greedy_token_ids list)
  read -r -a prompt <<<"$(field "$dir" prompt_token_ids args)"
  for exe in generate-c-shared generate-c-static generate-cpp-shared generate-cpp-static; do
    if [ "$exe" = generate-cpp-shared ]; then
      # This one finds the library through LD_LIBRARY_PATH rather than its rpath.
      out=$(LD_LIBRARY_PATH=$libdir "$build/$exe" "$dir" "${prompt[@]}")
    else
      out=$("$build/$exe" "$dir" "${prompt[@]}")
    fi
    got=$(sed -n 's/^greedy_token_ids: //p' <<<"$out")
    [ "$got" = "$want" ] || die "$exe $fixture: got $got, want $want"$'\n'"$out"
    grep -q '^stream: .*ancel' <<<"$out" || die "$exe $fixture: the stream was not cancelled"$'\n'"$out"
    printf '%-20s %-14s ok %s\n' "$exe" "$fixture" "$got"
  done
done

step "default prompt (chat template) of the C example"
"$build/generate-c-shared"

step "error paths"
"$build/errors-shared" | tail -3
"$build/errors-static" | tail -1

step "valgrind"
vg=(valgrind --leak-check=full --show-leak-kinds=definite --errors-for-leak-kinds=definite
  --error-exitcode=1)
for run in "generate-c-shared tests/fixtures/glm4-tiny 277" "errors-shared" \
  "generate-cpp-shared tests/fixtures/glm-tiny-bf16 490 153 64 174 242"; do
  name=${run%% *}
  log=$build/valgrind-$name.log
  # shellcheck disable=SC2086
  if ! "${vg[@]}" --log-file="$log" "$build"/$run >/dev/null; then
    cat "$log" >&2
    die "valgrind reported errors or definite leaks for $name"
  fi
  echo "$name:"
  grep -E "in use at exit|definitely lost|indirectly lost|possibly lost|still reachable|ERROR SUMMARY" "$log" |
    sed 's/^==[0-9]*== */  /'
done

step "ok"
