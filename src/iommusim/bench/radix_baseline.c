/*
 * radix_baseline.c - the C yardstick of iommusim's benchmarks.
 *
 * It does the radix-table work the model does, the plain way a hypervisor written in C does it: a tree
 * of 4 KiB tables of 512 64-bit entries, four levels deep, each table allocated with calloc when a map
 * first needs it.  The figures it prints are what the Python model's bulk paths are compared with.
 *
 * usage: radix_baseline PAGES REPEATS MFN_BASE LEAF_BITS ADDRESS_FILE
 *
 * Each repeat
 *   1. maps device frames 0 .. PAGES-1 one page at a time into a fresh tree: frame f becomes the leaf
 *      ((MFN_BASE + f) << 12) | LEAF_BITS, descending from the root and allocating missing tables;
 *   2. walks every device address of ADDRESS_FILE (little-endian 64-bit integers) through the four
 *      levels, adding each resulting machine address to a checksum (an absent entry counts a fault);
 *   3. frees the tree (not timed).
 * One extra repeat runs first as a warm-up and is not reported.  The checksum, the number of tables and
 * the sum of every leaf are printed so that the work cannot be optimised away and so that the caller can
 * check it against the Python baselines fed the same inputs.
 *
 * Output: one JSON object on stdout; the times are in nanoseconds (CLOCK_MONOTONIC).
 */
#define _POSIX_C_SOURCE 200809L

#include <errno.h>
#include <inttypes.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/resource.h>
#include <time.h>

#define ENTRIES 512
#define LEVELS 4
#define PRESENT 0x3ULL     /* an entry is present when it grants read or write */
#define PTR_MASK (~0xFULL) /* table pointers keep their low four bits for the flags */
#define ADDR_MASK 0x000FFFFFFFFFF000ULL

typedef uint64_t entry_t;

static uint64_t tables_allocated;

static int64_t now_ns(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (int64_t)ts.tv_sec * 1000000000LL + ts.tv_nsec;
}

static entry_t *new_table(void)
{
    entry_t *t = calloc(ENTRIES, sizeof(entry_t));
    if (t == NULL) {
        fprintf(stderr, "radix_baseline: out of memory after %" PRIu64 " tables\n", tables_allocated);
        exit(2);
    }
    if ((uintptr_t)t & ~PTR_MASK) {
        fprintf(stderr, "radix_baseline: calloc returned a pointer that is not 16-byte aligned\n");
        exit(2);
    }
    tables_allocated++;
    return t;
}

/* Map one 4 KiB device frame, allocating the tables on its path that do not exist yet. */
static void map_page(entry_t *root, uint64_t dfn, entry_t leaf)
{
    entry_t *t = root;
    for (int level = LEVELS; level > 1; level--) {
        entry_t *slot = &t[(dfn >> (9 * (level - 1))) & (ENTRIES - 1)];
        if (!(*slot & PRESENT)) {
            entry_t *child = new_table();
            *slot = (entry_t)(uintptr_t)child | PRESENT;
        }
        t = (entry_t *)(uintptr_t)(*slot & PTR_MASK);
    }
    t[dfn & (ENTRIES - 1)] = leaf;
}

/* Translate one device address; returns 0 and counts a fault when an entry on the way is absent. */
static uint64_t walk(const entry_t *root, uint64_t daddr, uint64_t *faults)
{
    uint64_t dfn = daddr >> 12;
    const entry_t *t = root;
    for (int level = LEVELS; level > 1; level--) {
        entry_t e = t[(dfn >> (9 * (level - 1))) & (ENTRIES - 1)];
        if (!(e & PRESENT)) {
            (*faults)++;
            return 0;
        }
        t = (const entry_t *)(uintptr_t)(e & PTR_MASK);
    }
    entry_t e = t[dfn & (ENTRIES - 1)];
    if (!(e & PRESENT)) {
        (*faults)++;
        return 0;
    }
    return (e & ADDR_MASK) | (daddr & 0xFFF);
}

static uint64_t leaf_sum(const entry_t *t, int level)
{
    uint64_t sum = 0;
    for (int i = 0; i < ENTRIES; i++) {
        if (!(t[i] & PRESENT))
            continue;
        if (level == 1)
            sum += t[i];
        else
            sum += leaf_sum((const entry_t *)(uintptr_t)(t[i] & PTR_MASK), level - 1);
    }
    return sum;
}

static void free_tree(entry_t *t, int level)
{
    if (level > 1)
        for (int i = 0; i < ENTRIES; i++)
            if (t[i] & PRESENT)
                free_tree((entry_t *)(uintptr_t)(t[i] & PTR_MASK), level - 1);
    free(t);
}

static int cmp_i64(const void *a, const void *b)
{
    int64_t x = *(const int64_t *)a, y = *(const int64_t *)b;
    return (x > y) - (x < y);
}

static int64_t median(const int64_t *samples, int n)
{
    int64_t *s = malloc(sizeof(int64_t) * (size_t)n);
    if (s == NULL)
        exit(2);
    memcpy(s, samples, sizeof(int64_t) * (size_t)n);
    qsort(s, (size_t)n, sizeof(int64_t), cmp_i64);
    int64_t m = n % 2 ? s[n / 2] : (s[n / 2 - 1] + s[n / 2]) / 2;
    free(s);
    return m;
}

static void print_samples(const char *name, const int64_t *samples, int n)
{
    printf("\"%s\": [", name);
    for (int i = 0; i < n; i++)
        printf("%s%" PRId64, i ? ", " : "", samples[i]);
    printf("], ");
}

static uint64_t parse_u64(const char *text, const char *what)
{
    char *end;
    errno = 0;
    unsigned long long v = strtoull(text, &end, 0);
    if (errno || *end || end == text) {
        fprintf(stderr, "radix_baseline: bad %s %s\n", what, text);
        exit(1);
    }
    return (uint64_t)v;
}

int main(int argc, char **argv)
{
    if (argc != 6) {
        fprintf(stderr, "usage: %s PAGES REPEATS MFN_BASE LEAF_BITS ADDRESS_FILE\n", argv[0]);
        return 1;
    }
    uint64_t pages = parse_u64(argv[1], "page count");
    int repeats = (int)parse_u64(argv[2], "repeat count");
    uint64_t mfn_base = parse_u64(argv[3], "machine frame");
    uint64_t leaf_bits = parse_u64(argv[4], "leaf bits");
    if (repeats < 1 || repeats > 1000 || pages > (1ULL << 36)) {
        fprintf(stderr, "radix_baseline: 1..1000 repeats of at most 2^36 pages\n");
        return 1;
    }

    FILE *f = fopen(argv[5], "rb");
    if (f == NULL) {
        perror(argv[5]);
        return 1;
    }
    fseek(f, 0, SEEK_END);
    long bytes = ftell(f);
    fseek(f, 0, SEEK_SET);
    size_t walks = (size_t)bytes / sizeof(uint64_t);
    uint64_t *daddrs = malloc(walks ? walks * sizeof(uint64_t) : 1);
    if (daddrs == NULL || fread(daddrs, sizeof(uint64_t), walks, f) != walks) {
        fprintf(stderr, "radix_baseline: cannot read %zu addresses from %s\n", walks, argv[5]);
        return 1;
    }
    fclose(f);

    int64_t *map_ns = calloc((size_t)repeats, sizeof(int64_t));
    int64_t *walk_ns = calloc((size_t)repeats, sizeof(int64_t));
    if (map_ns == NULL || walk_ns == NULL)
        return 2;
    uint64_t checksum = 0, faults = 0, tables = 0, leaves = 0;

    for (int r = -1; r < repeats; r++) {
        tables_allocated = 0;
        int64_t t0 = now_ns();
        entry_t *root = new_table();
        for (uint64_t dfn = 0; dfn < pages; dfn++)
            map_page(root, dfn, ((mfn_base + dfn) << 12) | leaf_bits);
        int64_t t1 = now_ns();

        uint64_t sum = 0, missed = 0;
        int64_t t2 = now_ns();
        for (size_t i = 0; i < walks; i++)
            sum += walk(root, daddrs[i], &missed);
        int64_t t3 = now_ns();

        uint64_t lsum = leaf_sum(root, LEVELS);
        if (r >= 0 && (sum != checksum || missed != faults || lsum != leaves)) {
            fprintf(stderr, "radix_baseline: repeats disagree\n");
            return 3;
        }
        checksum = sum;
        faults = missed;
        leaves = lsum;
        tables = tables_allocated;
        free_tree(root, LEVELS);
        if (r >= 0) {
            map_ns[r] = t1 - t0;
            walk_ns[r] = t3 - t2;
        }
    }

    struct rusage ru;
    getrusage(RUSAGE_SELF, &ru);
    printf("{\"pages\": %" PRIu64 ", \"walks\": %zu, \"repeats\": %d, ", pages, walks, repeats);
    print_samples("map_ns", map_ns, repeats);
    print_samples("walk_ns", walk_ns, repeats);
    printf("\"map_ns_median\": %" PRId64 ", \"walk_ns_median\": %" PRId64 ", ", median(map_ns, repeats),
           median(walk_ns, repeats));
    printf("\"tables\": %" PRIu64 ", \"leaf_sum\": %" PRIu64 ", \"walk_checksum\": %" PRIu64
           ", \"walk_faults\": %" PRIu64 ", \"max_rss_kib\": %ld}\n",
           tables, leaves, checksum, faults, ru.ru_maxrss);
    free(daddrs);
    free(map_ns);
    free(walk_ns);
    return 0;
}
