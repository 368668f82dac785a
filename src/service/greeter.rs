//! `helloworld.v1.Greeter`.

use crate::{biz::GreeterUsecase, pb::helloworld::v1 as pb};

/// The greeter, for the gRPC and HTTP servers alike.
#[derive(Debug, Default, Clone)]
pub struct GreeterService {
    greeter: GreeterUsecase,
}

impl GreeterService {
    /// A greeter over `greeter`.
    pub fn new(greeter: GreeterUsecase) -> Self {
        Self { greeter }
    }

    /// `SayHello`.
    pub fn say_hello(&self, req: pb::HelloRequest) -> pb::HelloReply {
        pb::HelloReply { message: self.greeter.greet(&req.name) }
    }
}
