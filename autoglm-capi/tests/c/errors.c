/*
 * errors.c: the error paths of the C API, from C (C99). Run by .ci/test-c.sh, also under
 * valgrind: every failing call must return the documented status with a non-empty message that
 * names the parameter or field, clear its outputs, and leak nothing.
 *
 *   errors [MODEL_DIR]      (default tests/fixtures/glm4-tiny)
 */
#include <stdio.h>
#include <string.h>

#include "autoglm.h"

static int failures = 0;
static int checks = 0;

/* Checks that `got` is `want` and that autoglm_last_error() mentions `needle`. */
static void expect(const char *what, autoglm_status got, autoglm_status want, const char *needle) {
    const char *msg = autoglm_last_error();
    checks++;
    if (got != want || msg == NULL || (want != AUTOGLM_STATUS_OK && msg[0] == '\0') ||
        (needle != NULL && strstr(msg, needle) == NULL)) {
        failures++;
        fprintf(stderr, "FAIL %s: got %s, want %s; message \"%s\" (want it to mention \"%s\")\n",
                what, autoglm_status_str((int)got), autoglm_status_str((int)want),
                msg ? msg : "(null)", needle ? needle : "");
    } else {
        printf("ok   %-44s %-17s %s\n", what, autoglm_status_str((int)got), msg);
    }
}

static void expect_true(const char *what, bool cond) {
    checks++;
    if (!cond) {
        failures++;
        fprintf(stderr, "FAIL %s\n", what);
    }
}

static bool never_called(const autoglm_event *ev, void *user_data) {
    (void)ev;
    (void)user_data;
    return true;
}

static autoglm_status generate_with(const autoglm_engine *engine,
                                    const autoglm_sampling_params *params) {
    uint32_t prompt[1] = {277};
    char *text = (char *)1;
    autoglm_status s =
        autoglm_engine_generate(engine, prompt, 1, params, &text, NULL, NULL, NULL, NULL);
    if (s != AUTOGLM_STATUS_OK) {
        expect_true("generate clears out_text on failure", text == NULL);
    }
    autoglm_string_free(s == AUTOGLM_STATUS_OK ? text : NULL);
    return s;
}

int main(int argc, char **argv) {
    const char *model_dir = argc > 1 ? argv[1] : "tests/fixtures/glm4-tiny";
    autoglm_engine *engine = (autoglm_engine *)1;
    autoglm_tokenizer *tok = NULL;
    autoglm_engine_options opts = autoglm_engine_options_default();
    autoglm_sampling_params p = autoglm_sampling_params_default();
    uint32_t prompt[1] = {277};
    uint32_t *ids = NULL;
    size_t len = 0;
    char *text = NULL;
    const char *bad_utf8 = "caf\xc3(";
    const char *stops[2] = {"ok", NULL};
    autoglm_status s;

    /* Engine creation. */
    s = autoglm_engine_new(NULL, NULL, &engine);
    expect("engine_new: model_dir NULL", s, AUTOGLM_STATUS_INVALID_ARGUMENT, "model_dir");
    expect_true("engine_new clears out_engine on failure", engine == NULL);
    s = autoglm_engine_new(model_dir, NULL, NULL);
    expect("engine_new: out_engine NULL", s, AUTOGLM_STATUS_INVALID_ARGUMENT, "out_engine");
    s = autoglm_engine_new(bad_utf8, NULL, &engine);
    expect("engine_new: model_dir invalid UTF-8", s, AUTOGLM_STATUS_INVALID_ARGUMENT, "UTF-8");
    s = autoglm_engine_new("/nonexistent/model", NULL, &engine);
    expect("engine_new: missing model", s, AUTOGLM_STATUS_MODEL_LOAD, "/nonexistent/model");
    opts.block_size = 0;
    s = autoglm_engine_new(model_dir, &opts, &engine);
    expect("engine_new: block_size 0", s, AUTOGLM_STATUS_INVALID_CONFIG, "block_size");
    opts = autoglm_engine_options_default();
    opts.device = "tpu";
    s = autoglm_engine_new(model_dir, &opts, &engine);
    expect("engine_new: unknown device", s, AUTOGLM_STATUS_INVALID_CONFIG, "tpu");
    opts.device = bad_utf8;
    s = autoglm_engine_new(model_dir, &opts, &engine);
    expect("engine_new: device invalid UTF-8", s, AUTOGLM_STATUS_INVALID_ARGUMENT, "options->device");
    opts = autoglm_engine_options_default();
    opts.num_compute_cores = 2;
    s = autoglm_engine_new(model_dir, &opts, &engine);
    expect("engine_new: compute_cores NULL", s, AUTOGLM_STATUS_INVALID_ARGUMENT, "compute_cores");
    opts = autoglm_engine_options_default();
    opts.limit_mm_per_prompt = "{image: 1}";
    s = autoglm_engine_new(model_dir, &opts, &engine);
    expect("engine_new: limit_mm_per_prompt bad JSON", s, AUTOGLM_STATUS_INVALID_ARGUMENT,
           "options->limit_mm_per_prompt");
    opts = autoglm_engine_options_default();
    opts.chat_template_content_format = "xml";
    s = autoglm_engine_new(model_dir, &opts, &engine);
    expect("engine_new: content format xml", s, AUTOGLM_STATUS_INVALID_CONFIG,
           "chat_template_content_format");

    opts = autoglm_engine_options_default();
    opts.device = "cpu";
    opts.kv_cache_mb = 16;
    s = autoglm_engine_new(model_dir, &opts, &engine);
    expect("engine_new: valid", s, AUTOGLM_STATUS_OK, NULL);
    if (s != AUTOGLM_STATUS_OK) {
        return 1;
    }

    /* Requests. */
    p.temperature = 0.0f;
    p.max_tokens = 2;
    s = autoglm_engine_generate(NULL, prompt, 1, &p, &text, NULL, NULL, NULL, NULL);
    expect("generate: engine NULL", s, AUTOGLM_STATUS_INVALID_ARGUMENT, "`engine` is NULL");
    s = autoglm_engine_generate(engine, NULL, 3, &p, &text, NULL, NULL, NULL, NULL);
    expect("generate: prompt NULL", s, AUTOGLM_STATUS_INVALID_ARGUMENT, "prompt_token_ids");
    s = autoglm_engine_generate(engine, prompt, 0, &p, &text, NULL, NULL, NULL, NULL);
    expect("generate: empty prompt", s, AUTOGLM_STATUS_INVALID_REQUEST, "empty");
    s = autoglm_engine_generate(engine, prompt, 1, &p, NULL, &ids, NULL, NULL, NULL);
    expect("generate: ids without len", s, AUTOGLM_STATUS_INVALID_ARGUMENT, "out_token_ids_len");
    p.top_p = 2.0f;
    expect("generate: top_p 2", generate_with(engine, &p), AUTOGLM_STATUS_INVALID_REQUEST, "top_p");
    p.top_p = 1.0f;
    p.max_tokens = 0;
    expect("generate: max_tokens 0", generate_with(engine, &p), AUTOGLM_STATUS_INVALID_REQUEST,
           "max_tokens");
    p.max_tokens = 2;
    p.has_logprobs = true;
    p.logprobs = 50;
    expect("generate: logprobs 50", generate_with(engine, &p), AUTOGLM_STATUS_INVALID_REQUEST,
           "logprobs");
    p.has_logprobs = false;
    p.n = 2;
    expect("generate: n 2 (blocking)", generate_with(engine, &p), AUTOGLM_STATUS_INVALID_REQUEST,
           "params->n");
    p.n = 1;
    p.stop = stops;
    p.stop_len = 2;
    expect("generate: stop[1] NULL", generate_with(engine, &p), AUTOGLM_STATUS_INVALID_ARGUMENT,
           "params->stop[1]");
    stops[1] = bad_utf8;
    expect("generate: stop[1] invalid UTF-8", generate_with(engine, &p),
           AUTOGLM_STATUS_INVALID_ARGUMENT, "UTF-8");
    p.stop = NULL;
    p.stop_len = 0;
    p.stop_token_ids_len = 4;
    expect("generate: stop_token_ids NULL", generate_with(engine, &p),
           AUTOGLM_STATUS_INVALID_ARGUMENT, "stop_token_ids");
    p.stop_token_ids_len = 0;
    expect("generate: valid (clears the message)", generate_with(engine, &p), AUTOGLM_STATUS_OK,
           "");
    s = autoglm_engine_generate_stream(engine, prompt, 1, &p, NULL, NULL);
    expect("generate_stream: callback NULL", s, AUTOGLM_STATUS_INVALID_ARGUMENT, "callback");
    s = autoglm_engine_generate_stream(engine, prompt, 1, NULL, never_called, NULL);
    expect("generate_stream: NULL params are defaults", s, AUTOGLM_STATUS_OK, NULL);
    s = autoglm_request_next(NULL, NULL);
    expect("request_next: out_event NULL", s, AUTOGLM_STATUS_INVALID_ARGUMENT, "out_event");

    /* Chat (this is a text-only model). */
    {
        static const uint8_t not_png[] = {0x89, 'P', 'N', 'G'};
        const char *hello = "[{\"role\": \"user\", \"content\": \"Hello\"}]";
        const char *with_image =
            "[{\"role\": \"user\", \"content\": [{\"type\": \"image\"}, "
            "{\"type\": \"text\", \"text\": \"What is this?\"}]}]";
        autoglm_image img = {not_png, sizeof not_png};
        autoglm_image null_data = {NULL, 8};
        autoglm_request *req = (autoglm_request *)1;
        text = (char *)1;
        s = autoglm_engine_chat(engine, "[{", NULL, NULL, 0, &p, &text, NULL, NULL, NULL, NULL);
        expect("chat: bad JSON", s, AUTOGLM_STATUS_INVALID_ARGUMENT, "messages_json");
        expect_true("chat clears out_text on failure", text == NULL);
        s = autoglm_engine_chat(engine, NULL, NULL, NULL, 0, &p, &text, NULL, NULL, NULL, NULL);
        expect("chat: messages NULL", s, AUTOGLM_STATUS_INVALID_ARGUMENT, "`messages_json` is NULL");
        s = autoglm_engine_chat(engine, hello, NULL, NULL, 2, &p, &text, NULL, NULL, NULL, NULL);
        expect("chat: images NULL, length 2", s, AUTOGLM_STATUS_INVALID_ARGUMENT, "`images`");
        s = autoglm_engine_chat(engine, with_image, NULL, &null_data, 1, &p, &text, NULL, NULL,
                                NULL, NULL);
        expect("chat: images[0].data NULL", s, AUTOGLM_STATUS_INVALID_ARGUMENT, "images[0].data");
        s = autoglm_engine_chat(engine, with_image, NULL, &img, 1, &p, &text, NULL, NULL, NULL,
                                NULL);
        expect("chat: image for a text-only model", s, AUTOGLM_STATUS_INVALID_REQUEST,
               "does not take images");
        s = autoglm_engine_chat_stream(engine, hello, NULL, NULL, 0, &p, NULL, NULL);
        expect("chat_stream: callback NULL", s, AUTOGLM_STATUS_INVALID_ARGUMENT, "callback");
        s = autoglm_request_new_chat(engine, hello, "[", NULL, 0, &p, &req);
        expect("request_new_chat: bad tools JSON", s, AUTOGLM_STATUS_INVALID_ARGUMENT,
               "tools_json");
        expect_true("request_new_chat clears out_request on failure", req == NULL);
        s = autoglm_engine_chat(engine, hello, NULL, NULL, 0, &p, &text, NULL, NULL, NULL, NULL);
        expect("chat: text only (valid)", s, AUTOGLM_STATUS_OK, NULL);
        autoglm_string_free(s == AUTOGLM_STATUS_OK ? text : NULL);
        text = NULL;
    }

    /* Tokenizer. */
    s = autoglm_tokenizer_new("/nonexistent", &tok);
    expect("tokenizer_new: missing dir", s, AUTOGLM_STATUS_MODEL_LOAD, "tokenizer.json");
    s = autoglm_engine_tokenizer(engine, &tok);
    expect("engine_tokenizer: valid", s, AUTOGLM_STATUS_OK, NULL);
    s = autoglm_tokenizer_encode(tok, bad_utf8, false, &ids, &len);
    expect("encode: invalid UTF-8", s, AUTOGLM_STATUS_INVALID_ARGUMENT, "`text`");
    expect_true("encode clears outputs on failure", ids == NULL && len == 0);
    s = autoglm_tokenizer_encode(tok, NULL, false, &ids, &len);
    expect("encode: text NULL", s, AUTOGLM_STATUS_INVALID_ARGUMENT, "`text` is NULL");
    s = autoglm_tokenizer_encode(NULL, "x", false, &ids, &len);
    expect("encode: tokenizer NULL", s, AUTOGLM_STATUS_INVALID_ARGUMENT, "`tokenizer` is NULL");
    s = autoglm_tokenizer_decode(tok, NULL, 2, true, &text, NULL);
    expect("decode: ids NULL", s, AUTOGLM_STATUS_INVALID_ARGUMENT, "`ids`");
    s = autoglm_tokenizer_apply_chat_template_json(tok, "[{", NULL, true, &text);
    expect("chat_template_json: bad JSON", s, AUTOGLM_STATUS_INVALID_ARGUMENT, "messages_json");
    s = autoglm_tokenizer_apply_chat_template_json(tok, "{}", NULL, true, &text);
    expect("chat_template_json: not an array", s, AUTOGLM_STATUS_TEMPLATE, "array");
    {
        autoglm_chat_message m = {"user", NULL};
        s = autoglm_tokenizer_apply_chat_template(tok, &m, 1, true, &text);
        expect("chat_template: content NULL", s, AUTOGLM_STATUS_INVALID_ARGUMENT,
               "messages[0].content");
    }
    expect_true("status_str of an unknown code", strcmp(autoglm_status_str(99), "UNKNOWN") == 0);

    /* Every _free accepts NULL. */
    autoglm_engine_free(NULL);
    autoglm_tokenizer_free(NULL);
    autoglm_request_free(NULL);
    autoglm_string_free(NULL);
    autoglm_token_ids_free(NULL);

    autoglm_tokenizer_free(tok);
    autoglm_engine_free(engine);
    printf("%d checks, %d failures\n", checks, failures);
    return failures != 0;
}
