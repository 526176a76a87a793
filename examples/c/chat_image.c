/*
 * chat_image.c: ask a GLM-4.1V (Glm4v) model about a PNG through the autoglm C API (C99).
 *
 *   chat_image [--format openai|string] [--max-tokens N] [--ignore-eos]
 *              [MODEL_DIR [IMAGE_FILE [QUESTION]]]
 *
 * Defaults: MODEL_DIR tests/fixtures/glm4v-tiny, IMAGE_FILE MODEL_DIR/screen.png (relative to
 * the repository root), QUESTION "What is on this screen?", --format openai, --max-tokens 16.
 *
 * Reads IMAGE_FILE into memory and sends it, undecoded, beside one user message whose content is
 * [{"type": "image"}, {"type": "text", "text": QUESTION}]: the {"type": "image"} part takes the
 * first (here the only) buffer of the autoglm_image array. Then
 *   1. autoglm_engine_chat: greedy decoding, waits for the answer, prints its token ids and text;
 *   2. autoglm_engine_chat_stream: the same request streamed, the text printed as it arrives,
 *      and checked to give the same tokens.
 *
 * --format sets autoglm_engine_options.chat_template_content_format: how the content list reaches
 * the chat template ("openai": the list itself; "string": one string, as Open-AutoGLM's vLLM
 * server is run). --ignore-eos keeps generating past end-of-sequence tokens, so that the output
 * has exactly N tokens (what .ci/test-c.sh compares with the fixture's "screen_openai" case via
 * the line "greedy_token_ids: [a, b, ...]").
 *
 * Ownership: the image buffer and the messages string are the program's; the library reads
 * them only during each call (it copies the bytes before returning), so they could be freed
 * right after it. The answer's text and ids are the program's to free with
 * autoglm_string_free / autoglm_token_ids_free.
 *
 * On failure the program prints the call, the status and autoglm_last_error() to stderr and
 * exits with 1 (a truncated PNG, for one: "... INVALID_REQUEST: ... image 0: ...").
 *
 * Build (see .ci/test-c.sh):
 *   cc -std=c99 -Wall -Wextra -Werror $(pkg-config --cflags autoglm) chat_image.c \
 *      $(pkg-config --libs autoglm) -o chat_image
 */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "autoglm.h"

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

/* Reads a whole file into a malloc'ed buffer; returns NULL (with a message) on failure. */
static uint8_t *read_file(const char *path, size_t *out_len) {
    FILE *f = fopen(path, "rb");
    uint8_t *buf = NULL;
    size_t len = 0, cap = 0, got;
    if (!f) {
        perror(path);
        return NULL;
    }
    do {
        if (len == cap) {
            uint8_t *bigger;
            cap = cap ? 2 * cap : 64 * 1024;
            bigger = realloc(buf, cap);
            if (!bigger) {
                fprintf(stderr, "%s: out of memory\n", path);
                free(buf);
                fclose(f);
                return NULL;
            }
            buf = bigger;
        }
        got = fread(buf + len, 1, cap - len, f);
        len += got;
    } while (got > 0);
    if (ferror(f)) {
        perror(path);
        free(buf);
        fclose(f);
        return NULL;
    }
    fclose(f);
    *out_len = len;
    return buf;
}

/* Appends `s` as a JSON string literal (quotes included) to `out` (at least 6 * strlen(s) + 3
 * bytes free); returns the end. */
static char *json_string(char *out, const char *s) {
    *out++ = '"';
    for (; *s; s++) {
        unsigned char c = (unsigned char)*s;
        if (c == '"' || c == '\\') {
            *out++ = '\\';
            *out++ = (char)c;
        } else if (c < 0x20) {
            out += sprintf(out, "\\u%04x", c);
        } else {
            *out++ = (char)c; /* UTF-8 bytes pass through */
        }
    }
    *out++ = '"';
    *out = '\0';
    return out;
}

/* The conversation: one user turn, the image first, then the question. Free with free(). */
static char *build_messages(const char *question) {
    static const char head[] =
        "[{\"role\": \"user\", \"content\": [{\"type\": \"image\"}, {\"type\": \"text\", \"text\": ";
    static const char tail[] = "}]}]";
    char *json = malloc(sizeof head + 6 * strlen(question) + 3 + sizeof tail);
    char *end;
    if (!json) {
        return NULL;
    }
    memcpy(json, head, sizeof head);
    end = json_string(json + sizeof head - 1, question);
    memcpy(end, tail, sizeof tail);
    return json;
}

/* State of the streaming callback, passed through user_data. */
typedef struct {
    uint32_t *tokens;
    size_t len, cap;
    autoglm_usage usage;
} stream_state;

static bool on_event(const autoglm_event *ev, void *user_data) {
    stream_state *st = (stream_state *)user_data;
    size_t i;
    for (i = 0; i < ev->token_ids_len && st->len < st->cap; i++) {
        st->tokens[st->len++] = ev->token_ids[i];
    }
    /* ev->text is text_len bytes of UTF-8, valid only during this call. */
    fwrite(ev->text, 1, ev->text_len, stdout);
    fflush(stdout);
    if (ev->usage) {
        st->usage = *ev->usage; /* the request's last event */
    }
    return true;
}

static int usage_error(const char *prog) {
    fprintf(stderr,
            "usage: %s [--format openai|string] [--max-tokens N] [--ignore-eos] "
            "[MODEL_DIR [IMAGE_FILE [QUESTION]]]\n",
            prog);
    return 2;
}

int main(int argc, char **argv) {
    const char *model_dir = "tests/fixtures/glm4v-tiny";
    const char *image_path = NULL;
    const char *question = "What is on this screen?";
    const char *format = "openai";
    unsigned long max_tokens = 16;
    bool ignore_eos = false;
    const char *positional[3];
    int npos = 0, i;
    char default_image[4096];
    uint8_t *png = NULL;
    size_t png_len = 0;
    char *messages = NULL;
    autoglm_engine *engine = NULL;
    char *text = NULL;
    uint32_t *ids = NULL;
    size_t ids_len = 0;
    autoglm_finish_reason reason;
    autoglm_usage usage;
    stream_state st = {NULL, 0, 0, {0, 0, 0}};
    autoglm_status s;
    int rc = 1;

    for (i = 1; i < argc; i++) {
        if (strcmp(argv[i], "--format") == 0 && i + 1 < argc) {
            format = argv[++i];
        } else if (strcmp(argv[i], "--max-tokens") == 0 && i + 1 < argc) {
            char *end;
            max_tokens = strtoul(argv[++i], &end, 10);
            if (*end || max_tokens == 0 || max_tokens > 100000) {
                return usage_error(argv[0]);
            }
        } else if (strcmp(argv[i], "--ignore-eos") == 0) {
            ignore_eos = true;
        } else if (argv[i][0] == '-' || npos == 3) {
            return usage_error(argv[0]);
        } else {
            positional[npos++] = argv[i];
        }
    }
    if (npos > 0) {
        model_dir = positional[0];
    }
    if (npos > 1) {
        image_path = positional[1];
    } else {
        snprintf(default_image, sizeof default_image, "%s/screen.png", model_dir);
        image_path = default_image;
    }
    if (npos > 2) {
        question = positional[2];
    }

    /* The image: the PNG file's bytes, as they are on disk. */
    png = read_file(image_path, &png_len);
    if (!png) {
        return 1;
    }
    messages = build_messages(question);
    if (!messages) {
        free(png);
        return 1;
    }

    /* Always from _default(): it sets opts.struct_size, which lets the library read a struct
     * laid out by an older or newer autoglm.h. A zeroed struct is refused. */
    autoglm_engine_options opts = autoglm_engine_options_default();
    opts.device = "cpu";
    opts.kv_cache_mb = 16; /* plenty for the tiny model */
    opts.chat_template_content_format = format;
    s = autoglm_engine_new(model_dir, &opts, &engine);
    if (s != AUTOGLM_STATUS_OK) {
        fail("autoglm_engine_new", s);
        goto out;
    }
    printf("autoglm %s, model %s, image %s (%zu bytes), content format %s\n", autoglm_version(),
           model_dir, image_path, png_len, format);
    printf("messages: %s\n", messages);

    autoglm_image image = {png, png_len};
    autoglm_sampling_params params = autoglm_sampling_params_default();
    params.temperature = 0.0f;
    params.max_tokens = (uint32_t)max_tokens;
    params.ignore_eos = ignore_eos;

    /* 1. Blocking: the library copies the image bytes and the messages before returning. */
    s = autoglm_engine_chat(engine, messages, NULL, &image, 1, &params, &text, &ids, &ids_len,
                            &reason, &usage);
    if (s != AUTOGLM_STATUS_OK) {
        fail("autoglm_engine_chat", s);
        goto out;
    }
    print_ids("greedy_token_ids", ids, ids_len);
    printf("text: \"%s\"\n", text);
    printf("finish_reason: %s, prompt_tokens %zu (image tokens included), completion_tokens %zu\n",
           autoglm_finish_reason_str((int)reason), usage.prompt_tokens, usage.completion_tokens);

    /* 2. Streamed: the same request, its text printed as it arrives. */
    st.cap = max_tokens;
    st.tokens = malloc(st.cap * sizeof *st.tokens);
    if (!st.tokens) {
        goto out;
    }
    printf("stream: \"");
    s = autoglm_engine_chat_stream(engine, messages, NULL, &image, 1, &params, on_event, &st);
    printf("\"\n");
    if (s != AUTOGLM_STATUS_OK) {
        fail("autoglm_engine_chat_stream", s);
        goto out;
    }
    print_ids("streamed_token_ids", st.tokens, st.len);
    if (st.len != ids_len || memcmp(st.tokens, ids, ids_len * sizeof *ids) != 0 ||
        st.usage.prompt_tokens != usage.prompt_tokens) {
        fprintf(stderr, "the streamed request differs from the blocking one\n");
        goto out;
    }
    rc = 0;

out:
    free(st.tokens);
    autoglm_string_free(text);
    autoglm_token_ids_free(ids);
    autoglm_engine_free(engine);
    free(messages);
    free(png);
    return rc;
}
