//! Bad input is an error that names what is wrong, never a panic: shard specs that do not fit the
//! checkpoint, incomplete shard files, malformed batches, and a tensor-parallel peer that fails.

mod common;

use std::sync::Arc;

use common::*;
use shard_tool::plan::Slice;
use tessera_kernels::cpu::Pool;
use tessera_worker::{
    Batch, Engine, EngineOptions, Error, LocalGroup, Logits, Numerics, ShardDir, SingleRank,
    Weights,
};

const F32: &str = "gguf/tiny_llama.gguf";

#[test]
fn weights_errors_name_the_tensor() {
    let ckpt = open(F32);
    let plan = plan_for(&ckpt, 2, 1);
    let mut spec = plan.shard(0, 1).unwrap().clone();
    let t = spec
        .tensors
        .iter_mut()
        .find(|t| t.name == "blk.1.attn_k.weight")
        .unwrap();
    t.slice = Slice::Rows { start: 0, end: 8 };
    t.shape[1] = 8;
    let err = Weights::from_checkpoint(&ckpt, &spec)
        .unwrap_err()
        .to_string();
    assert_eq!(
        err,
        "tensor `blk.1.attn_k.weight`: slice shape [64, 8], but the config and shard spec imply [64, 16] (ggml \
         order: [input, rows])"
    );

    let mut spec = plan.shard(0, 0).unwrap().clone();
    spec.tensors
        .iter_mut()
        .find(|t| t.name == "blk.1.ffn_up.weight")
        .unwrap()
        .name = "blk.1.ffn_upp.weight".into();
    let err = Weights::from_checkpoint(&ckpt, &spec)
        .unwrap_err()
        .to_string();
    assert_eq!(err, "missing tensor `blk.1.ffn_up.weight`");

    let mut spec = plan.shard(0, 0).unwrap().clone();
    spec.kv_heads = 1..2;
    let err = Weights::from_checkpoint(&ckpt, &spec)
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("query head 0 reads KV head 0, which is not among this rank's KV heads 1..2"),
        "{err}"
    );

    // A plan made for another checkpoint (Q8_0 types) does not fit the F32 file.
    let q8 = open("gguf/tiny_llama_q8_0.gguf");
    let err = Weights::from_checkpoint(&ckpt, plan_for(&q8, 1, 1).shard(0, 0).unwrap())
        .unwrap_err()
        .to_string();
    assert_eq!(
        err,
        "tensor `blk.0.attn_q.weight`: the checkpoint has F32 [64, 64], the shard spec was planned for Q8_0 [64, 64]"
    );
}

#[test]
fn truncated_shard_file_is_refused() {
    let ckpt = open(F32);
    let tmp = tempfile::tempdir().unwrap();
    let plan = plan_for(&ckpt, 1, 2);
    let opts = shard_tool::split::SplitOptions {
        out_dir: tmp.path().to_owned(),
        force: false,
        progress: false,
    };
    shard_tool::split::split(&ckpt, &plan, &opts).unwrap();
    let err = ShardDir::open(tmp.path(), 0, 3).unwrap_err().to_string();
    assert!(
        err.contains("has no such shard (plan is tp=1, pp=2)"),
        "{err}"
    );
    let file = tmp.path().join("stage01-rank00.gguf");
    let len = std::fs::metadata(&file).unwrap().len();
    std::fs::OpenOptions::new()
        .write(true)
        .open(&file)
        .unwrap()
        .set_len(len - 10)
        .unwrap();
    let err = ShardDir::open(tmp.path(), 1, 0).unwrap_err().to_string();
    assert!(
        err.contains(&format!("is {} bytes, the manifest says {len}", len - 10)),
        "{err}"
    );
}

#[test]
fn malformed_batches_are_errors() {
    let ckpt = open(F32);
    let mut engine = single(&ckpt);
    let mut cache = engine.new_cache(16, None).unwrap();
    let mut other = engine.new_cache(16, None).unwrap();
    let mut batch = Batch::new();
    let msg = |r: tessera_worker::Result<tessera_worker::Output<'_>>| r.unwrap_err().to_string();

    batch.push_tokens(0, &[1, 2, 3], Logits::Last);
    assert_eq!(
        msg(engine.forward(&batch, &mut [])),
        "batch: 1 sequences but 0 KV caches"
    );
    batch.clear();
    batch.push_tokens(2, &[1], Logits::Last);
    assert_eq!(
        msg(engine.forward(&batch, &mut [&mut cache])),
        "batch: sequence 0 starts at position 2, but its cache holds only positions 0..0"
    );
    batch.clear();
    batch.push_tokens(0, &[1, 288], Logits::Last);
    assert_eq!(
        msg(engine.forward(&batch, &mut [&mut cache])),
        "batch: token 1 is id 288, outside the vocabulary of 288"
    );
    batch.clear();
    batch.push_tokens(0, &[1; 17], Logits::Last);
    assert_eq!(
        msg(engine.forward(&batch, &mut [&mut cache])),
        "batch: sequence 0: positions 0..17 exceed its KV cache's context of 16"
    );
    batch.clear();
    batch.push_tokens(0, &[1; 65], Logits::Last);
    assert!(
        msg(engine.forward(&batch, &mut [&mut cache]))
            .contains("65 tokens, but the engine's buffers hold at most 64")
    );
    batch.clear();
    batch.push_hidden(0, 1, &[0.0; 64], Logits::Last);
    assert!(
        msg(engine.forward(&batch, &mut [&mut cache]))
            .contains("the first stage takes 1 token ids")
    );

    // A cache made for another shard (stage 1 of a pp=2 plan) is refused.
    let plan = plan_for(&ckpt, 1, 2);
    let stage1 = plan.shard(1, 0).unwrap();
    let mut foreign = tessera_worker::KvCache::new(&ckpt.config, stage1, 16, None).unwrap();
    batch.clear();
    batch.push_tokens(0, &[1], Logits::Last);
    assert!(
        msg(engine.forward(&batch, &mut [&mut foreign]))
            .contains("its KV cache is for layers 1..2")
    );

    // After all that, the engine and caches still work, and the cache was not advanced by failed calls.
    assert!(cache.is_empty());
    batch.clear();
    batch.push_tokens(0, &[283, 51], Logits::Last);
    batch.push_tokens(0, &[283], Logits::Last);
    let rows = engine
        .forward(&batch, &mut [&mut cache, &mut other])
        .unwrap()
        .logits()
        .unwrap()
        .len();
    assert_eq!(rows, 2 * 288);
    assert_eq!((cache.len(), other.len()), (2, 1));
}

#[test]
fn engine_checks_its_collective() {
    let ckpt = open(F32);
    let plan = plan_for(&ckpt, 2, 1);
    let spec = plan.shard(0, 1).unwrap().clone();
    let w = Weights::from_checkpoint(&ckpt, &spec).unwrap();
    let err = Engine::new(
        w,
        ckpt.config.clone(),
        spec,
        Box::new(SingleRank),
        Arc::new(Pool::new(1)),
        options(),
    );
    let err = err.err().unwrap().to_string();
    assert_eq!(
        err,
        "shard spec (stage 0, rank 1): the collective is rank 0 of 1, the shard is rank 1"
    );
}

/// llama.cpp's AVX2 numerics read GGUF row order: packed weights are refused with the tensor's name, and
/// weights laid out for the options are accepted.
#[test]
fn llama_cpp_numerics_refuse_packed_weights() {
    let ckpt = open(F32);
    let plan = plan_for(&ckpt, 1, 1);
    let spec = plan.shard(0, 0).unwrap().clone();
    let opts = EngineOptions {
        numerics: Numerics::LlamaCppAvx2,
        ..options()
    };
    let engine = |w: Weights<'_>| {
        Engine::new(
            w,
            ckpt.config.clone(),
            spec.clone(),
            Box::new(SingleRank),
            Arc::new(Pool::new(1)),
            opts,
        )
        .map(|_| ())
    };
    let packed = Weights::from_checkpoint(&ckpt, &spec).unwrap();
    let first_packed = packed
        .matrices()
        .find(|m| m.packed.is_some())
        .map(|m| m.name.clone());
    let avx2 = tessera_kernels::cpu::Kernels::for_isa(tessera_kernels::cpu::Isa::Avx2).is_some();
    match (engine(packed), first_packed) {
        (Err(e), Some(name)) => assert_eq!(
            e.to_string(),
            format!(
                "shard spec (stage 0, rank 0): llama.cpp AVX2 numerics read weights in GGUF row order, but \
                 {name} is packed (load them with Weights::from_checkpoint_with these options)"
            )
        ),
        (result, first) => assert!(
            first.is_none() && result.is_ok() == avx2,
            "packed {first:?}: {:?}",
            result.err().map(|e| e.to_string())
        ),
    }
    let laid_out = Weights::from_checkpoint_with(&ckpt, &spec, &opts).unwrap();
    assert!(laid_out.matrices().all(|m| m.packed.is_none()));
    assert_eq!(engine(laid_out).is_ok(), avx2);
}

/// A rank whose forward fails and whose engine goes away makes its peers fail too, instead of hanging.
#[test]
fn failing_rank_releases_its_peers() {
    let ckpt = open(F32);
    let plan = plan_for(&ckpt, 2, 1);
    let mut group = LocalGroup::new(2);
    let g1 = group.pop().unwrap();
    let g0 = group.pop().unwrap();
    let mut e0 = shard_engine(&ckpt, &plan, 0, 0, Box::new(g0));
    let mut e1 = shard_engine(&ckpt, &plan, 0, 1, Box::new(g1));
    let mut good = Batch::new();
    good.push_tokens(0, &[283, 51], Logits::Last);
    let mut bad = Batch::new();
    bad.push_tokens(0, &[283, 9999], Logits::Last);
    let mut c0 = e0.new_cache(8, None).unwrap();
    let mut c1 = e1.new_cache(8, None).unwrap();
    std::thread::scope(|s| {
        let h = s.spawn(move || {
            let r = e1
                .forward(&bad, &mut [&mut c1])
                .map(|_| ())
                .unwrap_err()
                .to_string();
            drop(e1);
            r
        });
        let err = e0.forward(&good, &mut [&mut c0]).map(|_| ()).unwrap_err();
        assert!(matches!(err, Error::Collective(_)), "{err}");
        assert_eq!(err.to_string(), "all-reduce: rank 1 of 2 left the group");
        assert!(h.join().unwrap().contains("outside the vocabulary"));
    });
    assert!(c0.is_empty());
}
