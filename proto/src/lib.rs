//! Wire protocols of Tessera. This crate will own the `.proto` files and the only `build.rs` that generates
//! gRPC code (client API `tessera.v1`, worker API `tessera.worker.v1`); it is a placeholder until the cluster
//! work (issue 4) adds them, so that every other crate already depends on the right place.
