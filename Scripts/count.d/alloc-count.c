// Counts heap allocations for Scripts/count: loaded with LD_PRELOAD, it forwards malloc, calloc, realloc,
// posix_memalign, aligned_alloc and memalign to glibc's own entry points and counts each call; on SIGUSR2 it writes
// the count (a decimal number and a newline) to the file named by ALLOC_COUNT_FILE. Frees are not counted.
#define _GNU_SOURCE
#include <errno.h>
#include <fcntl.h>
#include <signal.h>
#include <stdatomic.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

extern void *__libc_malloc(size_t);
extern void *__libc_calloc(size_t, size_t);
extern void *__libc_realloc(void *, size_t);
extern void *__libc_memalign(size_t, size_t);

static atomic_ulong allocations;
static char path[4096];

void *malloc(size_t size) {
    atomic_fetch_add_explicit(&allocations, 1, memory_order_relaxed);
    return __libc_malloc(size);
}

void *calloc(size_t count, size_t size) {
    atomic_fetch_add_explicit(&allocations, 1, memory_order_relaxed);
    return __libc_calloc(count, size);
}

void *realloc(void *pointer, size_t size) {
    atomic_fetch_add_explicit(&allocations, 1, memory_order_relaxed);
    return __libc_realloc(pointer, size);
}

void *memalign(size_t alignment, size_t size) {
    atomic_fetch_add_explicit(&allocations, 1, memory_order_relaxed);
    return __libc_memalign(alignment, size);
}

void *aligned_alloc(size_t alignment, size_t size) { return memalign(alignment, size); }

int posix_memalign(void **result, size_t alignment, size_t size) {
    void *pointer = memalign(alignment, size);
    if (pointer == NULL) return ENOMEM;
    *result = pointer;
    return 0;
}

static void report(int signal) {
    (void)signal;
    char digits[32];
    char text[34];
    unsigned long value = atomic_load(&allocations);
    int count = 0;
    do {
        digits[count++] = (char)('0' + value % 10);
        value /= 10;
    } while (value > 0);
    for (int i = 0; i < count; i++) text[i] = digits[count - 1 - i];
    text[count] = '\n';
    int fd = open(path, O_WRONLY | O_CREAT | O_TRUNC | O_CLOEXEC, 0644);
    if (fd < 0) return;
    ssize_t written = write(fd, text, (size_t)count + 1);
    (void)written;
    close(fd);
}

__attribute__((constructor)) static void start(void) {
    const char *file = getenv("ALLOC_COUNT_FILE");
    if (file == NULL || strlen(file) >= sizeof(path)) return;
    strcpy(path, file);
    struct sigaction action;
    memset(&action, 0, sizeof(action));
    action.sa_handler = report;
    action.sa_flags = SA_RESTART;
    sigaction(SIGUSR2, &action, NULL);
}
