/*
 * find_cache_collision.c - two uint8 images, different at every byte, that give the same
 * Triton 2.51 (r24.10, Boost 1.80) response-cache key.
 *
 * How it works: Triton folds each input byte into one running 64-bit seed with Boost 1.80's
 * hash_combine, the MurmurHash2-64 step h = ((h ^ mix(byte)) * M + 0xe6546b64) mod 2^64
 * (see tests/triton_cache_key.py), starting from a seed fixed by model name, version and input
 * name.  Image a is a fixed pattern and b = 255 - a (so they differ everywhere), except the last
 * 9 bytes: there a gets 9 bytes < 128 and b 9 bytes >= 128 (still different everywhere), 63 free
 * bits per side.  Running both prefixes from the request's seed gives two states Sa, Sb; the
 * function F(x) = state after the 9-byte tail chosen by x (top bit of x = side a or b, the other
 * 63 bits = the 9 x 7 tail bits) maps 64 bits to 64 bits, so a generic birthday search finds
 * F(x) = F(y) after about 2^32 evaluations; half of those collisions have x and y on different
 * sides, which is a full-image collision.  The search is van Oorschot-Wiener parallel collision
 * search: many interleaved walks x -> F(x) per thread stop at distinguished points (low D bits
 * zero), kept in a shared table; two walks reaching the same point are re-walked to the merge.
 * Expected run: some 1e10 F evaluations (~1.4e8/s on 2 cores), about a minute or two.  Build and
 * run:  cc -O2 -pthread -o /tmp/fcc scripts/find_cache_collision.c
 *       /tmp/fcc [--model support_encoder] [--version 1] [--input support_images]
 *                [--seed HEX] [--threads 2] [--time-limit 600] [--out DIR]
 * It prints the starting seed, the prefix states, the two tails and the final hashes, and with
 * --out writes DIR/a.bin and DIR/b.bin (12288 bytes each, C order of a (1,1,3,64,64) image).
 * Exit 0: found (and re-verified over the whole buffers); 2: time limit reached.
 */
#include <pthread.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#define N_BYTES 12288
#define TAIL 9
#define DP_BITS 20
#define NCHAIN 16
#define MAX_TRAIL (20ull << DP_BITS)
#define TABLE_BITS 20

static const uint64_t M = 0xc6a4a7935bd1e995ull;
static const uint64_t ADD = 0xe6546b64ull;
static uint64_t K[256];  /* mixed k of hash_combine(seed, (unsigned char)b) */

static uint64_t mix(uint64_t k) { k *= M; k ^= k >> 47; k *= M; return k; }
static uint64_t combine(uint64_t h, uint64_t v) { return ((h ^ mix(v)) * M) + ADD; }
static uint64_t str_hash(const char *s) {  /* boost 1.80 hash<std::string>, signed char */
  uint64_t h = 0;
  for (; *s; ++s) h = combine(h, (uint64_t)(int64_t)(signed char)*s);
  return h;
}
static uint64_t run_bytes(uint64_t h, const uint8_t *p, size_t n) {
  for (size_t i = 0; i < n; ++i) h = ((h ^ K[p[i]]) * M) + ADD;
  return h;
}

static uint8_t img_a[N_BYTES], img_b[N_BYTES];
static uint64_t S[2];  /* states after the prefixes of a and b */

static void tail_of(uint64_t x, uint8_t *t) {
  uint64_t side = x >> 63;
  for (int i = 0; i < TAIL; ++i) t[i] = (uint8_t)(((x >> (7 * i)) & 127) | (side << 7));
}
static uint64_t F(uint64_t x) {
  uint64_t h = S[x >> 63], hi = (x >> 63) << 7;
  for (int i = 0; i < TAIL; ++i) h = ((h ^ K[((x >> (7 * i)) & 127) | hi]) * M) + ADD;
  return h;
}

/* shared state */
typedef struct { uint64_t dp, start, len; } Entry;
static Entry *table;
static pthread_mutex_t lock = PTHREAD_MUTEX_INITIALIZER;
static volatile int done = 0;
static uint64_t found_x, found_y;
static double t0, time_limit = 600;
static unsigned long long evals_total = 0, dps = 0, merges = 0;

static double now(void) { struct timespec ts; clock_gettime(CLOCK_MONOTONIC, &ts); return ts.tv_sec + ts.tv_nsec * 1e-9; }
static uint64_t splitmix(uint64_t *s) {
  uint64_t z = (*s += 0x9e3779b97f4a7c15ull);
  z = (z ^ (z >> 30)) * 0xbf58476d1ce4e5b9ull; z = (z ^ (z >> 27)) * 0x94d049bb133111ebull;
  return z ^ (z >> 31);
}

/* two walks (s1,l1), (s2,l2) end at the same point: find x != y with F(x) == F(y) */
static int locate(uint64_t s1, uint64_t l1, uint64_t s2, uint64_t l2, uint64_t *x, uint64_t *y) {
  while (l1 > l2) { s1 = F(s1); --l1; }
  while (l2 > l1) { s2 = F(s2); --l2; }
  if (s1 == s2) return 0;  /* one walk contains the other's start */
  for (uint64_t i = 0; i < l1; ++i) {
    uint64_t f1 = F(s1), f2 = F(s2);
    if (f1 == f2) { *x = s1; *y = s2; return 1; }
    s1 = f1; s2 = f2;
  }
  return 0;
}

static void handle_dp(uint64_t dp, uint64_t start, uint64_t len) {
  pthread_mutex_lock(&lock);
  ++dps;
  uint64_t mask = (1ull << TABLE_BITS) - 1, i = (dp >> DP_BITS) & mask;
  while (table[i].len && table[i].dp != dp) i = (i + 1) & mask;
  if (!table[i].len) { table[i].dp = dp; table[i].start = start; table[i].len = len; pthread_mutex_unlock(&lock); return; }
  Entry e = table[i];
  pthread_mutex_unlock(&lock);
  uint64_t x, y;
  if (e.start != start && locate(start, len, e.start, e.len, &x, &y)) {
    pthread_mutex_lock(&lock);
    ++merges;
    int useful = (x >> 63) != (y >> 63);
    fprintf(stderr, "  collision %llu at %.1fs: F(%016llx) = F(%016llx) = %016llx%s\n", merges, now() - t0,
            (unsigned long long)x, (unsigned long long)y, (unsigned long long)F(x), useful ? "  (a/b: found)" : "  (same side, go on)");
    if (useful && !done) { done = 1; found_x = (x >> 63) ? y : x; found_y = (x >> 63) ? x : y; }
    pthread_mutex_unlock(&lock);
  }
}

static void *worker(void *arg) {
  uint64_t rng = (uint64_t)(uintptr_t)arg * 0x1234567ull + (uint64_t)time(NULL);
  uint64_t x[NCHAIN], start[NCHAIN], len[NCHAIN];
  for (int c = 0; c < NCHAIN; ++c) { x[c] = start[c] = splitmix(&rng); len[c] = 0; }
  const uint64_t dpmask = (1ull << DP_BITS) - 1;
  unsigned long long ev = 0;
  while (!done) {
    for (int r = 0; r < 4096; ++r) {
      uint64_t h[NCHAIN];
      for (int c = 0; c < NCHAIN; ++c) {
        uint64_t v = x[c], hi = (v >> 63) << 7, hh = S[v >> 63];
#pragma GCC unroll 9
        for (int i = 0; i < TAIL; ++i) { hh = ((hh ^ K[(v & 127) | hi]) * M) + ADD; v >>= 7; }
        h[c] = hh;
      }
      for (int c = 0; c < NCHAIN; ++c) {
        x[c] = h[c]; ++len[c];
        if ((h[c] & dpmask) == 0) {
          handle_dp(h[c], start[c], len[c]);
          x[c] = start[c] = splitmix(&rng); len[c] = 0;
        } else if (len[c] > MAX_TRAIL) {  /* walk stuck in a cycle without a distinguished point */
          x[c] = start[c] = splitmix(&rng); len[c] = 0;
        }
      }
    }
    ev += 4096ull * NCHAIN;
    if (now() - t0 > time_limit) break;
  }
  pthread_mutex_lock(&lock); evals_total += ev; pthread_mutex_unlock(&lock);
  return NULL;
}

int main(int argc, char **argv) {
  const char *model = "support_encoder", *input = "support_images", *out = NULL;
  long long version = 1; int threads = 2, have_seed = 0; uint64_t seed = 0;
  for (int i = 1; i + 1 < argc; i += 2) {
    if (!strcmp(argv[i], "--model")) model = argv[i + 1];
    else if (!strcmp(argv[i], "--version")) version = atoll(argv[i + 1]);
    else if (!strcmp(argv[i], "--input")) input = argv[i + 1];
    else if (!strcmp(argv[i], "--seed")) { seed = strtoull(argv[i + 1], NULL, 16); have_seed = 1; }
    else if (!strcmp(argv[i], "--threads")) threads = atoi(argv[i + 1]);
    else if (!strcmp(argv[i], "--time-limit")) time_limit = atof(argv[i + 1]);
    else if (!strcmp(argv[i], "--out")) out = argv[i + 1];
    else { fprintf(stderr, "unknown option %s\n", argv[i]); return 1; }
  }
  for (int b = 0; b < 256; ++b) K[b] = mix((uint64_t)b);
  if (!have_seed) {  /* TritonCache::Hash up to the first input's bytes */
    seed = combine(0, str_hash(model));
    seed = combine(seed, (uint64_t)version);
    seed = combine(seed, str_hash(input));
    printf("context: model=%s version=%lld input=%s\n", model, version, input);
  }
  printf("start seed: %016llx\n", (unsigned long long)seed);
  /* a: a smooth RGB pattern of a (1,1,3,64,64) image; b = 255 - a */
  for (int c = 0; c < 3; ++c)
    for (int yy = 0; yy < 64; ++yy)
      for (int xx = 0; xx < 64; ++xx) {
        int i = c * 4096 + yy * 64 + xx;
        img_a[i] = (uint8_t)((c == 0 ? 4 * xx : c == 1 ? 4 * yy : 2 * (xx + yy)) & 255);
        img_b[i] = (uint8_t)(255 - img_a[i]);
      }
  S[0] = run_bytes(seed, img_a, N_BYTES - TAIL);
  S[1] = run_bytes(seed, img_b, N_BYTES - TAIL);
  printf("prefix states: a %016llx  b %016llx (after %d bytes)\n", (unsigned long long)S[0], (unsigned long long)S[1], N_BYTES - TAIL);
  fflush(stdout);
  table = calloc(1ull << TABLE_BITS, sizeof(Entry));
  pthread_t th[64];
  if (threads < 1) threads = 1;
  if (threads > 64) threads = 64;
  t0 = now();
  for (int i = 0; i < threads; ++i) pthread_create(&th[i], NULL, worker, (void *)(uintptr_t)(i + 1));
  for (int i = 0; i < threads; ++i) pthread_join(th[i], NULL);
  double dt = now() - t0;
  printf("search: %.1f s, %.3g evaluations of F (%.3g /s), %llu distinguished points, %llu merges\n",
         dt, (double)evals_total, evals_total / dt, dps, merges);
  if (!done) { printf("no a/b collision within the time limit\n"); return 2; }
  uint8_t ta[TAIL], tb[TAIL];
  tail_of(found_x, ta); tail_of(found_y, tb);
  memcpy(img_a + N_BYTES - TAIL, ta, TAIL); memcpy(img_b + N_BYTES - TAIL, tb, TAIL);
  printf("x_a %016llx  x_b %016llx\ntail a:", (unsigned long long)found_x, (unsigned long long)found_y);
  for (int i = 0; i < TAIL; ++i) printf(" %u", ta[i]);
  printf("\ntail b:");
  for (int i = 0; i < TAIL; ++i) printf(" %u", tb[i]);
  uint64_t ha = run_bytes(seed, img_a, N_BYTES), hb = run_bytes(seed, img_b, N_BYTES);
  int differ = 1;
  for (int i = 0; i < N_BYTES; ++i) differ &= img_a[i] != img_b[i];
  printf("\nfull-buffer hashes from the start seed: a %016llx  b %016llx  %s, all bytes differ: %s\n",
         (unsigned long long)ha, (unsigned long long)hb, ha == hb ? "EQUAL" : "DIFFERENT", differ ? "yes" : "no");
  if (out) {
    char p[4096]; FILE *f;
    snprintf(p, sizeof p, "%s/a.bin", out); f = fopen(p, "wb"); if (!f) { perror(p); return 1; } fwrite(img_a, 1, N_BYTES, f); fclose(f);
    snprintf(p, sizeof p, "%s/b.bin", out); f = fopen(p, "wb"); if (!f) { perror(p); return 1; } fwrite(img_b, 1, N_BYTES, f); fclose(f);
    printf("wrote %s/a.bin and %s/b.bin\n", out, out);
  }
  return ha == hb && differ ? 0 : 1;
}
