//! Compiles `proto/` into prost messages, tonic services, proto3-JSON (pbjson) serde impls
//! and the descriptor set served by gRPC reflection. protoc comes from the
//! `protoc-bin-vendored` crate, so no system protoc is needed.

use std::{env, path::PathBuf};

const PROTOS: &[&str] = &[
    "proto/helloworld/v1/greeter.proto",
    "proto/resource/v1/resource.proto",
    "proto/resource/v1/error_reason.proto",
    "proto/mq/v1/event.proto",
];

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let out_dir = PathBuf::from(env::var("OUT_DIR")?);
    let descriptor_path = out_dir.join("resource_descriptor.bin");

    let mut config = prost_build::Config::new();
    config.protoc_executable(protoc_bin_vendored::protoc_bin_path()?);
    let wkt_include = protoc_bin_vendored::include_path()?;
    // Maps (labels) in key order, so JSON and comparisons are deterministic.
    config.btree_map([".resource.v1"]);

    tonic_prost_build::configure()
        // prost's codec, but an undecodable request is INVALID_ARGUMENT (src/server/codec.rs).
        .codec_path("crate::server::codec::Codec")
        .file_descriptor_set_path(&descriptor_path)
        .compile_well_known_types(true)
        .extern_path(".google.protobuf", "::pbjson_types")
        .compile_with_config(
            config,
            &PROTOS.iter().map(PathBuf::from).collect::<Vec<_>>(),
            &[PathBuf::from("proto"), wkt_include],
        )?;

    // proto3 JSON: proto field names on output (both spellings accepted on input),
    // zero values emitted like the Kratos codec's EmitUnpopulated, unknown fields ignored.
    let descriptors = std::fs::read(&descriptor_path)?;
    pbjson_build::Builder::new()
        .register_descriptors(&descriptors)?
        .preserve_proto_field_names()
        .emit_fields()
        .ignore_unknown_fields()
        .btree_map([".resource.v1"])
        .build(&[".helloworld", ".resource", ".mq"])?;

    println!("cargo:rerun-if-changed=proto");
    Ok(())
}
