// generate.cpp: the autoglm C API from C++17 through a small RAII wrapper.
//
//   generate [MODEL_DIR [TOKEN_ID ...]]
//
// Same behaviour and output as examples/c/generate.c: prints "greedy_token_ids: [...]" for the
// prompt (TOKEN_IDs, or "Hello" through the chat template), then streams the request and cancels
// it after 3 tokens by returning false from the callback.
//
// Build (see .ci/test-c.sh):
//   c++ -std=c++17 -Wall -Wextra -Werror $(pkg-config --cflags autoglm) generate.cpp
//       $(pkg-config --libs autoglm) -o generate      (one command line)
#include <algorithm>
#include <cstdint>
#include <cstdlib>
#include <exception>
#include <functional>
#include <iostream>
#include <memory>
#include <stdexcept>
#include <string>
#include <utility>
#include <vector>

#include "autoglm.h"

namespace autoglm {

// A failed call: its status and the library's message.
class Error : public std::runtime_error {
  public:
    Error(autoglm_status status, const std::string &what)
        : std::runtime_error(what + ": " + autoglm_status_str(status) + ": " +
                             autoglm_last_error()),
          status_(status) {}
    autoglm_status status() const { return status_; }

  private:
    autoglm_status status_;
};

inline void check(autoglm_status s, const char *what) {
    if (s != AUTOGLM_STATUS_OK) throw Error(s, what);
}

// Owners of what the library hands out, each released by its matching _free.
struct Free {
    void operator()(autoglm_engine *p) const { autoglm_engine_free(p); }
    void operator()(autoglm_tokenizer *p) const { autoglm_tokenizer_free(p); }
    void operator()(char *p) const { autoglm_string_free(p); }
    void operator()(uint32_t *p) const { autoglm_token_ids_free(p); }
};
using CString = std::unique_ptr<char, Free>;
using TokenIds = std::unique_ptr<uint32_t, Free>;

inline std::vector<uint32_t> to_vector(TokenIds ids, size_t len) {
    return std::vector<uint32_t>(ids.get(), ids.get() + len);
}

// Thread-safe, like the handle it owns; movable, not copyable.
class Tokenizer {
  public:
    explicit Tokenizer(autoglm_tokenizer *owned) : h_(owned) {}

    std::vector<uint32_t> encode(const std::string &text, bool add_special_tokens) const {
        uint32_t *ids = nullptr;
        size_t len = 0;
        check(autoglm_tokenizer_encode(h_.get(), text.c_str(), add_special_tokens, &ids, &len),
              "encode");
        return to_vector(TokenIds(ids), len);
    }

    std::string decode(const std::vector<uint32_t> &ids, bool skip_special_tokens) const {
        char *text = nullptr;
        size_t len = 0;
        check(autoglm_tokenizer_decode(h_.get(), ids.data(), ids.size(), skip_special_tokens,
                                       &text, &len),
              "decode");
        CString owned(text);
        return std::string(owned.get(), len);
    }

    std::string apply_chat_template(const std::vector<std::pair<std::string, std::string>> &chat,
                                    bool add_generation_prompt) const {
        std::vector<autoglm_chat_message> msgs;
        for (const auto &[role, content] : chat) msgs.push_back({role.c_str(), content.c_str()});
        char *text = nullptr;
        check(autoglm_tokenizer_apply_chat_template(h_.get(), msgs.data(), msgs.size(),
                                                    add_generation_prompt, &text),
              "apply_chat_template");
        return CString(text).get();
    }

  private:
    std::unique_ptr<autoglm_tokenizer, Free> h_;
};

struct Completion {
    std::vector<uint32_t> token_ids;
    std::string text;
    autoglm_finish_reason finish_reason = AUTOGLM_FINISH_REASON_NONE;
    autoglm_usage usage{};
};

// Thread-safe, like the handle it owns; movable, not copyable.
class Engine {
  public:
    explicit Engine(const std::string &model_dir,
                    const autoglm_engine_options &options = autoglm_engine_options_default()) {
        autoglm_engine *e = nullptr;
        check(autoglm_engine_new(model_dir.c_str(), &options, &e), "autoglm_engine_new");
        h_.reset(e);
    }

    Tokenizer tokenizer() const {
        autoglm_tokenizer *t = nullptr;
        check(autoglm_engine_tokenizer(h_.get(), &t), "autoglm_engine_tokenizer");
        return Tokenizer(t);
    }

    Completion generate(const std::vector<uint32_t> &prompt,
                        const autoglm_sampling_params &params) const {
        char *text = nullptr;
        uint32_t *ids = nullptr;
        size_t len = 0;
        Completion c;
        check(autoglm_engine_generate(h_.get(), prompt.data(), prompt.size(), &params, &text,
                                      &ids, &len, &c.finish_reason, &c.usage),
              "autoglm_engine_generate");
        CString owned_text(text);
        c.token_ids = to_vector(TokenIds(ids), len);
        c.text = owned_text.get();
        return c;
    }

    // Calls `on_event` for each event; returning false cancels the request. Returns true when the
    // request ran to its end, false when it was cancelled. An exception thrown by `on_event`
    // cancels the request and is rethrown here (it must not cross the C library).
    bool stream(const std::vector<uint32_t> &prompt, const autoglm_sampling_params &params,
                const std::function<bool(const autoglm_event &)> &on_event) const {
        Trampoline t{on_event, nullptr};
        autoglm_status s = autoglm_engine_generate_stream(h_.get(), prompt.data(), prompt.size(),
                                                          &params, &Trampoline::call, &t);
        if (t.error) std::rethrow_exception(t.error);
        if (s == AUTOGLM_STATUS_CANCELLED) return false;
        check(s, "autoglm_engine_generate_stream");
        return true;
    }

  private:
    struct Trampoline {
        const std::function<bool(const autoglm_event &)> &fn;
        std::exception_ptr error;

        static bool call(const autoglm_event *ev, void *user_data) {
            auto *self = static_cast<Trampoline *>(user_data);
            try {
                return self->fn(*ev);
            } catch (...) {
                self->error = std::current_exception();
                return false;
            }
        }
    };

    std::unique_ptr<autoglm_engine, Free> h_;
};

}  // namespace autoglm

static void print_ids(const char *label, const std::vector<uint32_t> &ids) {
    std::cout << label << ": [";
    for (size_t i = 0; i < ids.size(); i++) std::cout << (i ? ", " : "") << ids[i];
    std::cout << "]\n";
}

int main(int argc, char **argv) try {
    const std::string model_dir = argc > 1 ? argv[1] : "tests/fixtures/glm4-tiny";
    // Always from _default(): it sets opts.struct_size, which lets the library read a struct
    // laid out by an older or newer autoglm.h. A zeroed (value-initialised) struct is refused.
    autoglm_engine_options opts = autoglm_engine_options_default();
    opts.device = "cpu";
    opts.kv_cache_mb = 16;  // plenty for the tiny model
    const autoglm::Engine engine(model_dir, opts);
    const autoglm::Tokenizer tokenizer = engine.tokenizer();
    std::cout << "autoglm " << autoglm_version() << ", model " << model_dir << "\n";

    std::vector<uint32_t> prompt;
    for (int i = 2; i < argc; i++) prompt.push_back(std::strtoul(argv[i], nullptr, 10));
    if (prompt.empty()) {
        const std::string chat = tokenizer.apply_chat_template({{"user", "Hello"}}, true);
        std::cout << "chat prompt: " << chat << "\n";
        prompt = tokenizer.encode(chat, false);
    }
    print_ids("prompt_token_ids", prompt);

    autoglm_sampling_params params = autoglm_sampling_params_default();
    params.temperature = 0.0f;
    params.max_tokens = 24;
    params.ignore_eos = true;
    const autoglm::Completion greedy = engine.generate(prompt, params);
    print_ids("greedy_token_ids", greedy.token_ids);
    std::cout << "greedy_text: \"" << greedy.text << "\"\n"
              << "finish_reason: " << autoglm_finish_reason_str(greedy.finish_reason)
              << ", prompt_tokens " << greedy.usage.prompt_tokens << ", completion_tokens "
              << greedy.usage.completion_tokens << "\n";

    std::vector<uint32_t> streamed;
    const bool finished = engine.stream(prompt, params, [&](const autoglm_event &ev) {
        streamed.insert(streamed.end(), ev.token_ids, ev.token_ids + ev.token_ids_len);
        std::cout << "  event: completion " << ev.index << ", " << ev.token_ids_len
                  << " token(s), text \"" << std::string(ev.text, ev.text_len) << "\"\n";
        return streamed.size() < 3;
    });
    print_ids("streamed_token_ids", streamed);
    std::cout << "stream: " << (finished ? "finished" : "cancelled") << "\n";
    if (finished || streamed.size() < 3 ||
        !std::equal(streamed.begin(), streamed.begin() + 3, greedy.token_ids.begin())) {
        std::cerr << "the stream was not cancelled after the greedy tokens\n";
        return 1;
    }

    std::cout << "decoded (with special tokens): \"" << tokenizer.decode(greedy.token_ids, false)
              << "\"\n";
    return 0;
} catch (const std::exception &e) {
    std::cerr << "error: " << e.what() << "\n";
    return 1;
}
