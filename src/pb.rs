//! Generated protobuf messages, tonic services and their proto3-JSON serde impls.

#![allow(clippy::all, missing_docs)]

/// `helloworld.v1`: the Kratos-layout greeter.
pub mod helloworld {
    pub mod v1 {
        tonic::include_proto!("helloworld.v1");
        include!(concat!(env!("OUT_DIR"), "/helloworld.v1.serde.rs"));
    }
}

/// `resource.v1`: the instance API.
pub mod resource {
    pub mod v1 {
        tonic::include_proto!("resource.v1");
        include!(concat!(env!("OUT_DIR"), "/resource.v1.serde.rs"));
    }
}

/// `mq.v1`: the event wire contract.
pub mod mq {
    pub mod v1 {
        tonic::include_proto!("mq.v1");
        include!(concat!(env!("OUT_DIR"), "/mq.v1.serde.rs"));
    }
}

/// Encoded `FileDescriptorSet` of every proto above (and the well-known types they use),
/// served by gRPC reflection.
pub const FILE_DESCRIPTOR_SET: &[u8] =
    include_bytes!(concat!(env!("OUT_DIR"), "/resource_descriptor.bin"));
