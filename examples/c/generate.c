/*
 * generate.c: the autoglm C API in one program (C99).
 *
 *   generate [MODEL_DIR [TOKEN_ID ...]]
 *
 * Loads MODEL_DIR (default: the bundled tests/fixtures/glm4-tiny, relative to the repository
 * root), then
 *   1. prints the greedy continuation (24 tokens, end-of-sequence ignored) of the prompt: the
 *      TOKEN_IDs when given, else "Hello" rendered through the model's chat template;
 *   2. streams the same request with a callback that cancels it after 3 tokens;
 *   3. decodes the greedy tokens back to text with the tokenizer.
 *
 * The line "greedy_token_ids: [a, b, ...]" is what .ci/test-c.sh compares with the fixture.
 *
 * Build (see .ci/test-c.sh):
 *   cc -std=c99 -Wall -Wextra -Werror $(pkg-config --cflags autoglm) generate.c \
 *      $(pkg-config --libs autoglm) -o generate
 */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "autoglm.h"

#define MAX_TOKENS 24
#define CANCEL_AFTER 3

/* Prints the failed call, its status and the library's message, and returns 1. */
static int fail(const char *what, autoglm_status status) {
    fprintf(stderr, "%s: %s: %s\n", what, autoglm_status_str((int)status), autoglm_last_error());
    return 1;
}

static void print_ids(const char *label, const uint32_t *ids, size_t len) {
    size_t i;
    printf("%s: [", label);
    for (i = 0; i < len; i++) {
        printf("%s%u", i ? ", " : "", (unsigned)ids[i]);
    }
    printf("]\n");
}

/* State of the streaming callback, passed through user_data. */
typedef struct {
    uint32_t tokens[MAX_TOKENS];
    size_t len;
} stream_state;

static bool on_event(const autoglm_event *ev, void *user_data) {
    stream_state *st = (stream_state *)user_data;
    size_t i;
    for (i = 0; i < ev->token_ids_len && st->len < MAX_TOKENS; i++) {
        st->tokens[st->len++] = ev->token_ids[i];
    }
    /* ev->text is text_len bytes of UTF-8 (also NUL-terminated); valid only during this call. */
    printf("  event: completion %zu, %zu token(s), text \"", ev->index, ev->token_ids_len);
    fwrite(ev->text, 1, ev->text_len, stdout);
    printf("\"\n");
    return st->len < CANCEL_AFTER; /* false cancels the request */
}

int main(int argc, char **argv) {
    const char *model_dir = argc > 1 ? argv[1] : "tests/fixtures/glm4-tiny";
    autoglm_engine *engine = NULL;
    autoglm_tokenizer *tokenizer = NULL;
    uint32_t *prompt = NULL; /* owned: from autoglm_tokenizer_encode or malloc */
    size_t prompt_len = 0;
    bool prompt_from_library = false;
    char *text = NULL;
    uint32_t *ids = NULL;
    size_t ids_len = 0;
    autoglm_finish_reason reason;
    autoglm_usage usage;
    stream_state st;
    int rc = 1;
    int i;
    autoglm_status s;

    /* Always from _default(): it sets opts.struct_size, which lets the library read a struct
     * laid out by an older or newer autoglm.h. A zeroed struct is refused. */
    autoglm_engine_options opts = autoglm_engine_options_default();
    opts.device = "cpu";
    opts.kv_cache_mb = 16; /* plenty for the tiny model */

    s = autoglm_engine_new(model_dir, &opts, &engine);
    if (s != AUTOGLM_STATUS_OK) {
        return fail("autoglm_engine_new", s);
    }
    s = autoglm_engine_tokenizer(engine, &tokenizer);
    if (s != AUTOGLM_STATUS_OK) {
        fail("autoglm_engine_tokenizer", s);
        goto out;
    }
    printf("autoglm %s, model %s\n", autoglm_version(), model_dir);

    if (argc > 2) {
        prompt_len = (size_t)(argc - 2);
        prompt = malloc(prompt_len * sizeof *prompt);
        if (!prompt) {
            goto out;
        }
        for (i = 2; i < argc; i++) {
            prompt[i - 2] = (uint32_t)strtoul(argv[i], NULL, 10);
        }
    } else {
        autoglm_chat_message msg = {"user", "Hello"};
        char *rendered = NULL;
        s = autoglm_tokenizer_apply_chat_template(tokenizer, &msg, 1, true, &rendered);
        if (s != AUTOGLM_STATUS_OK) {
            fail("autoglm_tokenizer_apply_chat_template", s);
            goto out;
        }
        printf("chat prompt: %s\n", rendered);
        s = autoglm_tokenizer_encode(tokenizer, rendered, false, &prompt, &prompt_len);
        autoglm_string_free(rendered);
        if (s != AUTOGLM_STATUS_OK) {
            fail("autoglm_tokenizer_encode", s);
            goto out;
        }
        prompt_from_library = true;
    }
    print_ids("prompt_token_ids", prompt, prompt_len);

    /* 1. Blocking greedy generation. */
    autoglm_sampling_params params = autoglm_sampling_params_default();
    params.temperature = 0.0f;
    params.max_tokens = MAX_TOKENS;
    params.ignore_eos = true;
    s = autoglm_engine_generate(engine, prompt, prompt_len, &params, &text, &ids, &ids_len,
                                &reason, &usage);
    if (s != AUTOGLM_STATUS_OK) {
        fail("autoglm_engine_generate", s);
        goto out;
    }
    print_ids("greedy_token_ids", ids, ids_len);
    printf("greedy_text: \"%s\"\n", text);
    printf("finish_reason: %s, prompt_tokens %zu, completion_tokens %zu\n",
           autoglm_finish_reason_str((int)reason), usage.prompt_tokens, usage.completion_tokens);

    /* 2. The same request, streamed, cancelled by the callback after CANCEL_AFTER tokens. */
    memset(&st, 0, sizeof st);
    s = autoglm_engine_generate_stream(engine, prompt, prompt_len, &params, on_event, &st);
    if (s != AUTOGLM_STATUS_CANCELLED) {
        fail("autoglm_engine_generate_stream", s);
        goto out;
    }
    print_ids("streamed_token_ids", st.tokens, st.len);
    printf("stream: %s (%s)\n", autoglm_status_str((int)s), autoglm_last_error());
    if (st.len < CANCEL_AFTER || memcmp(st.tokens, ids, CANCEL_AFTER * sizeof *ids) != 0) {
        fprintf(stderr, "the stream does not start with the greedy tokens\n");
        goto out;
    }

    /* 3. Decode the greedy tokens. */
    autoglm_string_free(text);
    text = NULL;
    s = autoglm_tokenizer_decode(tokenizer, ids, ids_len, false, &text, NULL);
    if (s != AUTOGLM_STATUS_OK) {
        fail("autoglm_tokenizer_decode", s);
        goto out;
    }
    printf("decoded (with special tokens): \"%s\"\n", text);
    rc = 0;

out:
    autoglm_string_free(text);
    autoglm_token_ids_free(ids);
    if (prompt_from_library) {
        autoglm_token_ids_free(prompt);
    } else {
        free(prompt);
    }
    autoglm_tokenizer_free(tokenizer);
    autoglm_engine_free(engine);
    return rc;
}
