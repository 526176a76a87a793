#!/usr/bin/env bash
# C and C++ checks of the autoglm C API (autoglm-capi): builds libautoglm.so and libautoglm.a,
# compiles examples/c/generate.c and examples/c/chat_image.c (C99), examples/cpp/generate.cpp
# (C++17) and autoglm-capi/tests/c/errors.c against each with warnings as errors, checks the
# greedy token ids they print against the fixtures (chat_image: a PNG sent as a byte buffer to
# glm4v-tiny, against transformers' tokens for the same message; and a truncated PNG must fail
# naming the image), runs the error-path program, and runs the C programs under valgrind (no
# definite leaks, no memory errors), the C++ example too. It also checks the ABI's struct_size
# rule with a caller built against an older layout (autoglm-capi/tests/c/old_layout.c), that the
# release libautoglm.so carries no debug info, and autoglm-capi/install.sh: installed to a
# temporary prefix, a C program built with `cc $(pkg-config --cflags --libs autoglm)` against it
# runs (and one linked statically from the same .pc file).
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
# autoglm-capi/build.rs links the release .so with --strip-debug: the engine's line tables
# would otherwise be most of its size (the .a keeps them; programs strip what they link).
if readelf -S "$libdir/libautoglm.so" | grep -q '\.debug_'; then
  die "the release libautoglm.so has debug sections"
fi
echo "libautoglm.so: $(stat -c %s "$libdir/libautoglm.so") bytes, no debug sections"

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
  compile cc C_FLAGS examples/c/chat_image.c "chat_image-$mode" $mode
  compile c++ CXX_FLAGS examples/cpp/generate.cpp "generate-cpp-$mode" $mode
  compile cc C_FLAGS autoglm-capi/tests/c/errors.c "errors-$mode" $mode
  compile cc C_FLAGS autoglm-capi/tests/c/old_layout.c "old_layout-$mode" $mode
done
for exe in generate-c-static chat_image-static generate-cpp-static errors-static; do
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

step "chat with a PNG (examples/c/chat_image.c on glm4v-tiny) against the fixture"
vdir=tests/fixtures/glm4v-tiny
# The case whose messages are one user turn: screen.png, then a text. Prints its name, content
# format, question, greedy ids, prompt length, and its messages as the example sends them (the
# image_url part as a sourceless {"type": "image"} part, the PNG beside the messages).
mapfile -t vcase < <(python3 - "$vdir/expected.json" <<'PY'
import json, sys
cases = json.load(open(sys.argv[1]))["cases"]
def fits(c):
    m = c["messages"]
    if len(m) != 1 or m[0]["role"] != "user" or not isinstance(m[0]["content"], list):
        return False
    parts = m[0]["content"]
    return [p["type"] for p in parts] == ["image_url", "text"] and \
        parts[0]["image_url"]["url"] == "screen.png"
found = [c for c in cases if fits(c)]
assert len(found) == 1, f"{len(found)} cases are one user turn with screen.png and a text"
c = found[0]
text = c["messages"][0]["content"][1]["text"]
sent = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": text}]}]
print(c["name"]); print(c["content_format"]); print(text)
print(", ".join(map(str, c["greedy_token_ids"]))); print(len(c["input_ids"]))
print(json.dumps(sent, ensure_ascii=False))
PY
)
((${#vcase[@]} == 6)) || die "could not read the image case from $vdir/expected.json"
vname=${vcase[0]} vformat=${vcase[1]} vquestion=${vcase[2]} vwant="[${vcase[3]}]"
vprompt=${vcase[4]} vmessages=${vcase[5]}
vcount=$(tr -cd , <<<"${vcase[3]}" | wc -c)
vcount=$((vcount + 1))
echo "case $vname: content format $vformat, $vcount tokens, prompt $vprompt tokens"
for exe in chat_image-shared chat_image-static; do
  out=$("$build/$exe" --format "$vformat" --max-tokens "$vcount" --ignore-eos \
    "$vdir" "$vdir/screen.png" "$vquestion")
  got=$(sed -n 's/^greedy_token_ids: //p' <<<"$out")
  [ "$got" = "$vwant" ] || die "$exe $vname: got $got, want $vwant"$'\n'"$out"
  sent=$(sed -n 's/^messages: //p' <<<"$out")
  python3 -c 'import json,sys; sys.exit(json.loads(sys.argv[1]) != json.loads(sys.argv[2]))' \
    "$sent" "$vmessages" || die "$exe sent $sent, the case is $vmessages"
  grep -q "prompt_tokens $vprompt " <<<"$out" || die "$exe: prompt is not $vprompt tokens"$'\n'"$out"
  grep -q '^streamed_token_ids: ' <<<"$out" || die "$exe: no streamed tokens"$'\n'"$out"
  printf '%-20s %-14s ok %s\n' "$exe" "$vname" "$got"
done

step "chat_image defaults (no arguments)"
"$build/chat_image-shared"

step "chat_image with a truncated PNG fails, naming the image"
truncated=$build/truncated.png
size=$(wc -c <"$vdir/screen.png")
head -c $((size / 2)) "$vdir/screen.png" >"$truncated"
set +e
err=$("$build/chat_image-shared" "$vdir" "$truncated" 2>&1 >/dev/null)
rc=$?
set -e
echo "exit $rc: $err"
[ "$rc" -ne 0 ] || die "a truncated PNG was accepted"
grep -q 'INVALID_REQUEST' <<<"$err" || die "a truncated PNG: not INVALID_REQUEST: $err"
grep -q 'image 0' <<<"$err" || die "a truncated PNG: the message does not name the image: $err"

step "error paths"
"$build/errors-shared" | tail -3
"$build/errors-static" | tail -1

step "a caller built against an older layout (struct_size)"
"$build/old_layout-shared" tests/fixtures/glm4-tiny
"$build/old_layout-static" tests/fixtures/glm4-tiny | tail -1

step "install.sh to a temporary prefix, then build against the installed .pc"
prefix=$(mktemp -d "${TMPDIR:-/tmp}/autoglm-prefix.XXXXXX")
trap 'rm -rf "$prefix"' EXIT
autoglm-capi/install.sh --prefix "$prefix" --no-build
[ -f "$prefix/include/autoglm.h" ] && [ -f "$prefix/lib/libautoglm.a" ] ||
  die "install.sh did not install the header and the static library"
grep -q "^prefix=$prefix\$" "$prefix/lib/pkgconfig/autoglm.pc" || die "autoglm.pc names another prefix"
(
  export PKG_CONFIG_PATH=$prefix/lib/pkgconfig
  # shellcheck disable=SC2046
  (set -x; cc -std=c99 -Wall -Wextra -Werror -pedantic examples/c/generate.c -o "$build/installed-shared" \
    $(pkg-config --cflags --libs autoglm) -Wl,-rpath,"$prefix/lib")
  ldd "$build/installed-shared" | grep -q "$prefix/lib/libautoglm.so" ||
    die "installed-shared does not load the installed library"
  # shellcheck disable=SC2046
  (set -x; cc -std=c99 -Wall -Wextra -Werror -pedantic examples/c/generate.c -o "$build/installed-static" \
    $(pkg-config --cflags autoglm) "$prefix/lib/libautoglm.a" \
    $(pkg-config --static --libs autoglm | sed 's/-lautoglm//'))
  dir=tests/fixtures/glm4-tiny
  want=$(field "$dir" greedy_token_ids list)
  read -r -a prompt <<<"$(field "$dir" prompt_token_ids args)"
  for exe in installed-shared installed-static; do
    got=$("$build/$exe" "$dir" "${prompt[@]}" | sed -n 's/^greedy_token_ids: //p')
    [ "$got" = "$want" ] || die "$exe: got $got, want $want"
    printf '%-20s ok %s\n' "$exe" "$got"
  done
)

step "valgrind"
vg=(valgrind --leak-check=full --show-leak-kinds=definite --errors-for-leak-kinds=definite
  --error-exitcode=1)
for run in "generate-c-shared tests/fixtures/glm4-tiny 277" "errors-shared" \
  "generate-cpp-shared tests/fixtures/glm-tiny-bf16 490 153 64 174 242" \
  "old_layout-shared tests/fixtures/glm4-tiny" \
  "chat_image-shared --max-tokens 4 --ignore-eos tests/fixtures/glm4v-tiny"; do
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
