#!/bin/bash
# cmake --install into a temporary prefix: the installed ditmoe-sample finds its default model
# under <prefix>/share/ditmoe from another working directory, also after the prefix is moved
# (relocatable), and `pkg-config --cflags --libs ditmoe` builds a program against libditmoe.so.
set -euo pipefail
BUILD=${DITMOE_BUILD:?DITMOE_BUILD (the build folder) not set}
tmp=$(mktemp -d /tmp/ditmoe-install-XXXXXX)
trap 'rm -rf "$tmp"' EXIT
cmake --install "$BUILD" --prefix "$tmp/p1" >/dev/null
for f in bin/ditmoe-sample bin/ditmoe-convert include/ditmoe.h lib/libditmoe.a \
         lib/pkgconfig/ditmoe.pc share/ditmoe/assets/ditmoe-fmnist.safetensors \
         share/ditmoe/assets/vae-fmnist.safetensors share/ditmoe/data/imagenet_classes.txt; do
  [ -e "$tmp/p1/$f" ] || { echo "FAIL: $f not installed"; exit 1; }
done
ls "$tmp"/p1/lib/libditmoe.so.* >/dev/null
mv "$tmp/p1" "$tmp/moved"                       # relocatable: nothing points at p1
mkdir "$tmp/elsewhere"
cd "$tmp/elsewhere"
env -u DITMOE_ASSETS "$tmp/moved/bin/ditmoe-sample" --class 3 --steps 2 --seed 1 -q -o img.png
[ -s img.png ] || { echo "FAIL: installed ditmoe-sample wrote no image"; exit 1; }
# The same image as the build tree's program with the source tree's model.
"${DITMOE_BIN:?}/ditmoe-sample" --model "${DITMOE_SRC:?}/assets/ditmoe-fmnist.safetensors" \
  --vae "$DITMOE_SRC/assets/vae-fmnist.safetensors" --class 3 --steps 2 --seed 1 -q -o ref.png
cmp img.png ref.png || { echo "FAIL: installed program's image differs"; exit 1; }
# The one error line for an ImageNet class id on the 10-class default model.
set +e
msg=$(env -u DITMOE_ASSETS "$tmp/moved/bin/ditmoe-sample" --class 207 --steps 50 -o x.png 2>&1)
rc=$?
set -e
[ "$rc" = 2 ] || { echo "FAIL: --class 207 exit $rc"; exit 1; }
[ "$(printf '%s\n' "$msg" | wc -l)" = 1 ] || { echo "FAIL: not one line: $msg"; exit 1; }
case "$msg" in *"golden retriever"*"--model"*) ;; *) echo "FAIL: message: $msg"; exit 1 ;; esac
# pkg-config: compile and run a tiny program against the installed shared library.
cat > t.c <<'C'
#include <ditmoe.h>
#include <stdio.h>
#include <string.h>
int main(int argc, char **argv)
{
    dm_model *m = NULL;
    if (dm_model_load(argv[1], &m) != DM_OK) { fprintf(stderr, "%s\n", dm_last_error()); return 1; }
    const dm_config *c = dm_model_config(m);
    printf("%s %s D=%d classes=%d\n", DITMOE_VERSION, c->name, c->hidden, c->num_classes);
    dm_model_free(m);
    return argc == 2 && strcmp(DITMOE_VERSION, "") ? 0 : 1;
}
C
export PKG_CONFIG_PATH="$tmp/moved/lib/pkgconfig"
cc -std=c11 t.c $(pkg-config --cflags --libs ditmoe) -o t
# A GCC sanitizer build's libditmoe.so needs the ASan runtime first in the process ("ASan runtime
# does not come first"): the plain program then runs with that runtime preloaded (leak checks off,
# as in test_python_pkg).
pre=
case "$(ldd "$tmp/moved/lib/libditmoe.so")" in
  *libasan*) pre="$(gcc -print-file-name=libasan.so):$(gcc -print-file-name=libubsan.so)"
             export ASAN_OPTIONS=detect_leaks=0 ;;
esac
out=$(LD_PRELOAD="$pre" LD_LIBRARY_PATH="$tmp/moved/lib" ./t "$tmp/moved/share/ditmoe/assets/ditmoe-fmnist.safetensors")
echo "pkg-config program: $out"
libs=$(LD_LIBRARY_PATH="$tmp/moved/lib" ldd ./t)
case "$libs" in *"$tmp/moved/lib/libditmoe.so.0"*) ;; *) echo "FAIL: not linked against the installed libditmoe.so: $libs"; exit 1 ;; esac
echo "test_install: ok"
