// Greedy continuation with a *native* (-march=native, AVX-512 here) build of the same llama.cpp that
// made tests/fixtures/engine/llama_cpp.json (that file's llama.cpp is the portable AVX2 build inside
// llama-cpp-python). Same settings as the fixture: F32 KV cache, flash attention off, 2 threads, the prompt
// in one llama_decode, then one token per llama_decode, argmax with ties to the lower id.
//
// Built and run by scripts/llama-cpp-greedy.sh; prints one JSON object:
//   {"ids": [...], "margins": [...]}   margins[i] = top-1 minus top-2 logit at step i.
//
//   llama_cpp_greedy MODEL.gguf N_GEN ID ID ID ...
#include <cstdio>
#include <cstdlib>
#include <vector>

#include "llama.h"

static void quiet(enum ggml_log_level, const char *, void *) {}

int main(int argc, char ** argv) {
    if (argc < 4) {
        fprintf(stderr, "usage: %s MODEL.gguf N_GEN PROMPT_ID...\n", argv[0]);
        return 2;
    }
    const int n_gen = atoi(argv[2]);
    std::vector<llama_token> prompt;
    for (int i = 3; i < argc; i++) {
        prompt.push_back((llama_token) atoi(argv[i]));
    }
    llama_log_set(quiet, nullptr);
    llama_backend_init();
    llama_model_params mp = llama_model_default_params();
    mp.n_gpu_layers = 0;
    llama_model * model = llama_model_load_from_file(argv[1], mp);
    if (!model) {
        fprintf(stderr, "cannot load %s\n", argv[1]);
        return 1;
    }
    llama_context_params cp = llama_context_default_params();
    cp.n_ctx = 256;
    cp.n_batch = 512;
    cp.n_ubatch = 512;
    cp.n_threads = 2;
    cp.n_threads_batch = 2;
    cp.type_k = GGML_TYPE_F32;
    cp.type_v = GGML_TYPE_F32;
    cp.flash_attn_type = LLAMA_FLASH_ATTN_TYPE_DISABLED;
    llama_context * ctx = llama_init_from_model(model, cp);
    if (!ctx) {
        fprintf(stderr, "cannot create a context\n");
        return 1;
    }
    const int n_vocab = llama_vocab_n_tokens(llama_model_get_vocab(model));

    // The prompt in one batch with logits for every position (written to $PROMPT_LOGITS as raw f32 when
    // set), as the fixture's llama-cpp-python run (logits_all) evaluated it.
    const int n_prompt = (int) prompt.size();
    llama_batch first = llama_batch_init(n_prompt, 0, 1);
    for (int i = 0; i < n_prompt; i++) {
        first.token[i] = prompt[i];
        first.pos[i] = i;
        first.n_seq_id[i] = 1;
        first.seq_id[i][0] = 0;
        first.logits[i] = 1;
    }
    first.n_tokens = n_prompt;
    if (llama_decode(ctx, first) != 0) {
        fprintf(stderr, "llama_decode failed on the prompt\n");
        return 1;
    }
    if (const char * path = getenv("PROMPT_LOGITS")) {
        FILE * f = fopen(path, "wb");
        for (int i = 0; f && i < n_prompt; i++) {
            fwrite(llama_get_logits_ith(ctx, i), sizeof(float), n_vocab, f);
        }
        if (f) fclose(f);
    }

    std::vector<llama_token> ids;
    std::vector<float> margins;
    llama_batch batch = first;
    llama_token tok = 0;
    for (int step = 0; step < n_gen; step++) {
        if (step > 0 && llama_decode(ctx, batch) != 0) {
            fprintf(stderr, "llama_decode failed at step %d\n", step);
            return 1;
        }
        const float * row = llama_get_logits_ith(ctx, -1);
        int best = 0, second = -1;
        for (int v = 1; v < n_vocab; v++) {
            if (row[v] > row[best]) {
                second = best;
                best = v;
            } else if (second < 0 || row[v] > row[second]) {
                second = v;
            }
        }
        ids.push_back(best);
        margins.push_back(row[best] - row[second]);
        tok = best;
        batch = llama_batch_get_one(&tok, 1);
    }
    printf("{\"ids\": [");
    for (size_t i = 0; i < ids.size(); i++) {
        printf("%s%d", i ? ", " : "", ids[i]);
    }
    printf("], \"margins\": [");
    for (size_t i = 0; i < margins.size(); i++) {
        printf("%s%.6g", i ? ", " : "", margins[i]);
    }
    printf("]}\n");
    llama_batch_free(first);
    llama_free(ctx);
    llama_model_free(model);
    llama_backend_free();
    return 0;
}
