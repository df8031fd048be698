// zlib (gzip framing) and Brotli's encoder, from Debian's zlib1g-dev and libbrotli-dev.
#ifndef GATEHOUSE_CCOMPRESSION_SHIM_H
#define GATEHOUSE_CCOMPRESSION_SHIM_H
#include <zlib.h>
#include <brotli/encode.h>

// deflateInit2 is a macro: gzip framing (window bits 15 + 16), the default memory level.
static inline int gatehouse_deflate_init_gzip(z_streamp stream, int level) {
    return deflateInit2(stream, level, Z_DEFLATED, 15 + 16, 8, Z_DEFAULT_STRATEGY);
}
#endif
