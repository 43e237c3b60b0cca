# cmake -DIN=file -DOUT=file.c -P embed.cmake: IN's bytes as dm_imagenet_txt[] in OUT.
file(READ ${IN} hex HEX)
string(LENGTH "${hex}" n)
math(EXPR len "${n} / 2")
string(REGEX REPLACE "([0-9a-f][0-9a-f])" "0x\\1," bytes "${hex}")
string(REGEX REPLACE "(0x..,0x..,0x..,0x..,0x..,0x..,0x..,0x..,0x..,0x..,0x..,0x..,0x..,0x..,0x..,0x..,)" "\\1\n" bytes "${bytes}")
file(WRITE ${OUT} "/* generated from ${IN} by scripts/embed.cmake */\n#include <stddef.h>\n"
  "const unsigned char dm_imagenet_txt[] = {\n${bytes}0};\nconst size_t dm_imagenet_txt_len = ${len};\n")
