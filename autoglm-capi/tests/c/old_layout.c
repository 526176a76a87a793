/*
 * old_layout.c: a caller compiled against an older autoglm.h keeps working (C99). Options
 * structs begin with `size_t struct_size`; fields are only appended, and the library reads only
 * those the caller's size covers. This program declares autoglm_engine_options as the first C
 * API had it (up to `seed`, before the multimodal strings were appended), passes it in a heap
 * block of exactly that size (valgrind would see a read past it), and generates the fixture's
 * greedy tokens. It also checks that a zero or too small struct_size is refused.
 *
 *   old_layout [MODEL_DIR]      (default tests/fixtures/glm4-tiny)
 */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "autoglm.h"

/* autoglm_engine_options of the first release, with the size field every layout begins with. */
typedef struct old_engine_options {
    size_t struct_size;
    const char *device;
    uint32_t block_size;
    uint32_t num_blocks;
    uint64_t kv_cache_mb;
    bool enable_prefix_caching;
    uint32_t max_num_seqs;
    uint32_t max_num_batched_tokens;
    uint32_t max_model_len;
    uint32_t num_threads;
    int32_t engine_core;
    const uint32_t *compute_cores;
    size_t num_compute_cores;
    uint64_t seed;
} old_engine_options;

static int fail(const char *what, autoglm_status s) {
    fprintf(stderr, "old_layout: %s: %s: %s\n", what, autoglm_status_str((int)s),
            autoglm_last_error());
    return 1;
}

int main(int argc, char **argv) {
    const char *model_dir = argc > 1 ? argv[1] : "tests/fixtures/glm4-tiny";
    /* What an old program's autoglm_engine_options_default() returned: today's defaults, cut. */
    autoglm_engine_options now = autoglm_engine_options_default();
    if (now.struct_size != sizeof(autoglm_engine_options)) {
        fprintf(stderr, "old_layout: the default struct_size is %zu, not %zu\n", now.struct_size,
                sizeof(autoglm_engine_options));
        return 1;
    }
    old_engine_options *old = malloc(sizeof *old);
    if (old == NULL) {
        return 1;
    }
    memcpy(old, &now, sizeof *old);
    old->struct_size = sizeof *old;
    old->num_threads = 1;
    old->kv_cache_mb = 16;

    autoglm_engine *engine = NULL;
    autoglm_status s =
        autoglm_engine_new(model_dir, (const autoglm_engine_options *)(const void *)old, &engine);
    free(old);
    if (s != AUTOGLM_STATUS_OK) {
        return fail("autoglm_engine_new with the old layout", s);
    }

    /* Zero (a struct not made by _default()) and less than the first layout are refused. */
    autoglm_engine *none = NULL;
    autoglm_engine_options bad = autoglm_engine_options_default();
    bad.struct_size = 0;
    s = autoglm_engine_new(model_dir, &bad, &none);
    if (s != AUTOGLM_STATUS_INVALID_ARGUMENT || strstr(autoglm_last_error(), "struct_size") == NULL ||
        none != NULL) {
        return fail("struct_size 0 must be INVALID_ARGUMENT naming struct_size", s);
    }
    bad.struct_size = sizeof(size_t) + sizeof(const char *);
    s = autoglm_engine_new(model_dir, &bad, &none);
    if (s != AUTOGLM_STATUS_INVALID_ARGUMENT) {
        return fail("a struct_size below the first layout must be INVALID_ARGUMENT", s);
    }
    autoglm_sampling_params params = autoglm_sampling_params_default();
    uint32_t prompt[1] = {277};
    params.struct_size = 0;
    s = autoglm_engine_generate(engine, prompt, 1, &params, NULL, NULL, NULL, NULL, NULL);
    if (s != AUTOGLM_STATUS_INVALID_ARGUMENT || strstr(autoglm_last_error(), "params->struct_size") == NULL) {
        return fail("params->struct_size 0 must be INVALID_ARGUMENT", s);
    }

    params = autoglm_sampling_params_default();
    params.temperature = 0.0f;
    params.max_tokens = 8;
    params.ignore_eos = true;
    uint32_t *ids = NULL;
    size_t len = 0;
    s = autoglm_engine_generate(engine, prompt, 1, &params, NULL, &ids, &len, NULL, NULL);
    if (s != AUTOGLM_STATUS_OK) {
        autoglm_engine_free(engine);
        return fail("autoglm_engine_generate", s);
    }
    printf("old layout (%zu of %zu bytes): greedy_token_ids:", sizeof(old_engine_options),
           sizeof(autoglm_engine_options));
    for (size_t i = 0; i < len; i++) {
        printf(" %u", ids[i]);
    }
    printf("\n");
    autoglm_token_ids_free(ids);
    autoglm_engine_free(engine);
    return len == 8 ? 0 : 1;
}
