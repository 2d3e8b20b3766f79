// Dumps every f32 tensor llama.cpp computes for one llama_decode call, to find the first op where the
// engine's numbers leave llama.cpp's (same settings as scripts/llama_cpp_greedy.cpp: F32 KV cache, flash
// attention off, 2 threads, the prompt in one llama_decode, then one token per llama_decode).
//
//   llama_cpp_dump MODEL.gguf OUT_DIR CALL N_GEN PROMPT_ID...
//
// Runs the prompt (call 0) and N_GEN greedy decode calls (1..N_GEN); call CALL's tensors are written to
// OUT_DIR/NAME.f32 (raw little-endian f32, ggml order ne0 fastest, strides resolved) and listed in
// OUT_DIR/index.tsv as `name ne0 ne1 ne2 ne3`. Greedy ids are printed to stdout, one per line.
#include <cstdio>
#include <cstdlib>
#include <map>
#include <string>
#include <vector>

#include "ggml.h"
#include "llama.h"

struct Dump {
    std::string dir;
    int call = 0;
    int want = 0;
    FILE * index = nullptr;
    std::map<std::string, int> seen;
};

static bool on_tensor(struct ggml_tensor * t, bool ask, void * user) {
    Dump * d = (Dump *) user;
    if (d->call != d->want || t->type != GGML_TYPE_F32) {
        return ask ? false : true;
    }
    if (ask) {
        return true;
    }
    // A name computed more than once (Qcur after the matmul, the reshape and the rope) keeps its last
    // value under NAME.f32 and each earlier one under NAME#K.f32.
    const int k = d->seen[t->name]++;
    if (k > 0) {
        std::string last = d->dir + "/" + t->name + ".f32";
        std::string kept = d->dir + "/" + t->name + "#" + std::to_string(k) + ".f32";
        rename(last.c_str(), kept.c_str());
    }
    std::string path = d->dir + "/" + t->name + ".f32";
    FILE * f = fopen(path.c_str(), "wb");
    if (!f) {
        return true;
    }
    for (int64_t i3 = 0; i3 < t->ne[3]; i3++)
        for (int64_t i2 = 0; i2 < t->ne[2]; i2++)
            for (int64_t i1 = 0; i1 < t->ne[1]; i1++)
                for (int64_t i0 = 0; i0 < t->ne[0]; i0++) {
                    const char * p = (const char *) t->data + i0 * t->nb[0] + i1 * t->nb[1] + i2 * t->nb[2] + i3 * t->nb[3];
                    fwrite(p, 4, 1, f);
                }
    fclose(f);
    fprintf(d->index, "%s\t%lld\t%lld\t%lld\t%lld\n", t->name, (long long) t->ne[0], (long long) t->ne[1],
            (long long) t->ne[2], (long long) t->ne[3]);
    return true;
}

static void quiet(enum ggml_log_level, const char *, void *) {}

int main(int argc, char ** argv) {
    if (argc < 6) {
        fprintf(stderr, "usage: %s MODEL.gguf OUT_DIR CALL N_GEN PROMPT_ID...\n", argv[0]);
        return 2;
    }
    Dump dump;
    dump.dir = argv[2];
    dump.want = atoi(argv[3]);
    const int n_gen = atoi(argv[4]);
    std::vector<llama_token> prompt;
    for (int i = 5; i < argc; i++) {
        prompt.push_back((llama_token) atoi(argv[i]));
    }
    dump.index = fopen((dump.dir + "/index.tsv").c_str(), "w");
    if (!dump.index) {
        fprintf(stderr, "cannot write %s/index.tsv\n", dump.dir.c_str());
        return 1;
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
    cp.cb_eval = on_tensor;
    cp.cb_eval_user_data = &dump;
    llama_context * ctx = llama_init_from_model(model, cp);
    if (!ctx) {
        fprintf(stderr, "cannot create a context\n");
        return 1;
    }
    const int n_vocab = llama_vocab_n_tokens(llama_model_get_vocab(model));
    const int n_prompt = (int) prompt.size();
    llama_batch batch = llama_batch_init(n_prompt, 0, 1);
    for (int i = 0; i < n_prompt; i++) {
        batch.token[i] = prompt[i];
        batch.pos[i] = i;
        batch.n_seq_id[i] = 1;
        batch.seq_id[i][0] = 0;
        batch.logits[i] = 1;
    }
    batch.n_tokens = n_prompt;
    int last = n_prompt - 1;
    for (int step = 0; step <= n_gen; step++) {
        dump.call = step;
        if (llama_decode(ctx, batch) != 0) {
            fprintf(stderr, "llama_decode failed at call %d\n", step);
            return 1;
        }
        const float * lg = llama_get_logits_ith(ctx, last);
        llama_token best = 0;
        for (int v = 1; v < n_vocab; v++) {
            if (lg[v] > lg[best]) {
                best = v;
            }
        }
        printf("%d\n", best);
        batch.token[0] = best;
        batch.pos[0] = n_prompt + step;
        batch.logits[0] = 1;
        batch.n_tokens = 1;
        last = 0;
    }
    fclose(dump.index);
    return 0;
}
