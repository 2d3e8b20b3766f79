//! Topologies and tensor lists the planner must refuse, each with an error that names the problem.

use tessera_kernels::quant::GgmlType;

use super::{model, plan_ok};
use crate::config::ModelConfig;
use crate::error::Error;
use crate::plan::*;
use crate::shapes::Preset;
use crate::tensor::TensorDesc;

fn expect_err(
    config: &ModelConfig,
    tensors: &[TensorDesc],
    topo: Topology,
    needles: &[&str],
) -> String {
    match plan(config, tensors, &topo) {
        Err(Error::Plan(msg)) => {
            for n in needles {
                assert!(msg.contains(n), "error `{msg}` does not mention `{n}`");
            }
            msg
        }
        Err(e) => panic!("wrong error kind: {e}"),
        Ok(_) => panic!(
            "tp={} pp={} {:?}: planned, expected an error about {needles:?}",
            topo.tp, topo.pp, topo.layer_ranges
        ),
    }
}

#[test]
fn invalid_topologies_are_refused_with_the_reason() {
    let (config, tensors) = model(Preset::SmolLm, GgmlType::Q8_0);
    expect_err(
        &config,
        &tensors,
        Topology::new(0, 1),
        &["tp", "at least 1"],
    );
    expect_err(
        &config,
        &tensors,
        Topology::new(1, 0),
        &["pp", "at least 1"],
    );
    expect_err(
        &config,
        &tensors,
        Topology::new(1, 31),
        &["pp=31", "30 layers"],
    );
    expect_err(
        &config,
        &tensors,
        Topology::new(10, 1),
        &["tp=10", "9 query heads", "tp ≤ 9"],
    );
    expect_err(&config, &tensors, Topology::new(MAX_TP + 1, 1), &["limit"]);
}

#[test]
fn k_quant_column_cuts_off_block_boundaries_are_refused() {
    // Tiny in Q4_K: 4 heads of 64 columns; tp=2 would cut attn_output at column 128.
    let (config, tensors) = model(Preset::Tiny, GgmlType::Q4_K);
    let msg = expect_err(
        &config,
        &tensors,
        Topology::new(2, 1),
        &[
            "blk.0.attn_output.weight",
            "Q4_K",
            "block size 256",
            "column 128",
            "rank 1",
        ],
    );
    assert!(msg.ends_with(": 1"), "suggests only tp=1: {msg}");
    // Llama 3.1 8B in Q4_K: tp=32 gives one 128-column head per rank; up to 16 keeps pairs of heads.
    let (config, tensors) = model(Preset::Llama3_8B, GgmlType::Q4_K);
    let msg = expect_err(
        &config,
        &tensors,
        Topology::new(32, 1),
        &["attn_output", "Q4_K", "256"],
    );
    assert!(
        msg.ends_with("1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15, 16"),
        "{msg}"
    );
    for tp in (1..=16).chain([24]) {
        let res = plan(&config, &tensors, &Topology::new(tp, 1));
        assert_eq!(res.is_ok(), tp <= 16, "tp={tp}");
    }
}

#[test]
fn ffn_with_fewer_blocks_than_ranks_is_refused() {
    // Tiny: n_ff 512 is 2 Q4_K blocks; keep attn_output cuttable (Q8_0) so the FFN is what fails at tp=4.
    let (config, mut tensors) = model(Preset::Tiny, GgmlType::Q4_K);
    for t in tensors
        .iter_mut()
        .filter(|t| t.name.ends_with("attn_output.weight"))
    {
        t.ty = GgmlType::Q8_0;
    }
    plan_ok(&config, &tensors, Topology::new(2, 1));
    expect_err(
        &config,
        &tensors,
        Topology::new(4, 1),
        &[
            "blk.0.ffn_down.weight",
            "Q4_K",
            "block size 256",
            "2 blocks",
            "tp ≤ 2",
        ],
    );
}

#[test]
fn explicit_layer_ranges_are_checked() {
    let (config, tensors) = model(Preset::SmolLm, GgmlType::Q8_0);
    let with = |text: &str, pp: usize| {
        Topology::new(1, pp).with_layer_ranges(Topology::parse_layer_ranges(text).unwrap())
    };
    expect_err(
        &config,
        &tensors,
        with("0-13,15-29", 2),
        &["gap", "layer 14 is in no stage", "stage 1"],
    );
    expect_err(
        &config,
        &tensors,
        with("0-12,15-29", 2),
        &["gap", "layers 13-14"],
    );
    expect_err(
        &config,
        &tensors,
        with("1-14,15-29", 2),
        &["gap", "layer 0"],
    );
    expect_err(
        &config,
        &tensors,
        with("0-15,15-29", 2),
        &["overlap", "layer 15"],
    );
    expect_err(
        &config,
        &tensors,
        with("0-14,15-28", 2),
        &["end at layer 28", "30 layers"],
    );
    expect_err(
        &config,
        &tensors,
        with("0-14,15-31", 2),
        &["end at layer 31", "30 layers"],
    );
    expect_err(
        &config,
        &tensors,
        with("0-9,10-19,20-29", 2),
        &["3 layer ranges", "pp=2"],
    );
    #[allow(clippy::reversed_empty_ranges)]
    let empty = Topology::new(1, 3).with_layer_ranges(vec![0..10, 10..10, 10..30]);
    expect_err(&config, &tensors, empty, &["empty", "stage 1"]);
    for bad in [
        "",
        "0-14;15-29",
        "a-b",
        "14-0",
        "0-14,",
        "-3",
        "0-99999999999999999999999",
    ] {
        match Topology::parse_layer_ranges(bad) {
            Err(Error::Plan(msg)) => assert!(msg.contains("layer"), "{msg}"),
            other => panic!("`{bad}` parsed: {other:?}"),
        }
    }
}

#[test]
fn tensor_lists_the_planner_cannot_handle_are_refused() {
    let (config, tensors) = model(Preset::SmolLm, GgmlType::Q8_0);
    let topo = Topology::new(3, 2);
    let mut extra = tensors.clone();
    extra.push(TensorDesc::new(
        "blk.0.attn_q.bias",
        GgmlType::F32,
        vec![576],
    ));
    expect_err(
        &config,
        &extra,
        topo.clone(),
        &["blk.0.attn_q.bias", "no sharding rule"],
    );
    for name in [
        "blk.x.attn_q.weight",
        "blk.+1.attn_q.weight",
        "blk..attn_q.weight",
        "mystery.weight",
    ] {
        let mut odd = tensors.clone();
        odd[1].name = name.into();
        expect_err(&config, &odd, topo.clone(), &[name]);
    }
    let mut beyond = tensors.clone();
    beyond[1].name = "blk.30.attn_norm.weight".into();
    expect_err(
        &config,
        &beyond,
        topo.clone(),
        &["blk.30.attn_norm.weight", "30 layers"],
    );

    let missing: Vec<_> = tensors
        .iter()
        .filter(|t| t.name != "blk.3.ffn_up.weight")
        .cloned()
        .collect();
    expect_err(
        &config,
        &missing,
        topo.clone(),
        &["missing", "blk.3.ffn_up.weight"],
    );
    let mut twice = tensors.clone();
    twice.push(tensors[5].clone());
    expect_err(&config, &twice, topo.clone(), &["twice", &tensors[5].name]);
    let mut reshaped = tensors.clone();
    reshaped[3].shape = vec![576, 191];
    expect_err(
        &config,
        &reshaped,
        topo.clone(),
        &["blk.0.attn_k.weight", "[576, 191]", "[576, 192]"],
    );
    let mut unaligned = tensors.clone();
    unaligned[2].ty = GgmlType::Q4_K;
    expect_err(
        &config,
        &unaligned,
        topo.clone(),
        &["blk.0.attn_q.weight", "Q4_K", "576"],
    );
    let mut bad_config = config.clone();
    bad_config.n_head_kv = 2;
    expect_err(
        &bad_config,
        &tensors,
        topo.clone(),
        &["model config", "head_count_kv"],
    );

    let (config, tensors) = model(Preset::Llama3_8B, GgmlType::Q4_K);
    let untied: Vec<_> = tensors
        .iter()
        .filter(|t| t.name != "output.weight")
        .cloned()
        .collect();
    expect_err(
        &config,
        &untied,
        Topology::new(1, 1),
        &["output.weight", "not tied"],
    );
    // An empty tensor list is refused, not planned.
    expect_err(
        &config,
        &[],
        Topology::new(1, 1),
        &["missing", "token_embd.weight"],
    );
}
