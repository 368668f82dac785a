//! The protobuf codec of the gRPC services: prost's, except that a request that does not
//! decode is the client's fault — `INVALID_ARGUMENT` with `ErrorInfo`, as every other
//! refusal — not tonic's `INTERNAL`.

use std::marker::PhantomData;

use prost::Message;
use tonic::{
    Status,
    codec::{BufferSettings, DecodeBuf, Decoder},
};
use tonic_prost::ProstEncoder;

use super::status::to_status;
use crate::biz;

/// See the module documentation; named by `build.rs` as the services' codec.
#[derive(Debug, Clone)]
pub struct Codec<T, U>(PhantomData<(T, U)>);

impl<T, U> Default for Codec<T, U> {
    fn default() -> Self {
        Self(PhantomData)
    }
}

impl<T, U> tonic::codec::Codec for Codec<T, U>
where
    T: Message + Send + 'static,
    U: Message + Default + Send + 'static,
{
    type Encode = T;
    type Decode = U;
    type Encoder = ProstEncoder<T>;
    type Decoder = RefusingDecoder<U>;

    fn encoder(&mut self) -> Self::Encoder {
        ProstEncoder::new(BufferSettings::default())
    }

    fn decoder(&mut self) -> Self::Decoder {
        RefusingDecoder(PhantomData)
    }
}

/// prost's decoding, with a malformed message refused as `INVALID_ARGUMENT`.
#[derive(Debug, Clone, Default)]
pub struct RefusingDecoder<U>(PhantomData<U>);

impl<U: Message + Default> Decoder for RefusingDecoder<U> {
    type Item = U;
    type Error = Status;

    fn decode(&mut self, buf: &mut DecodeBuf<'_>) -> Result<Option<U>, Status> {
        U::decode(buf).map(Some).map_err(|e| {
            to_status(biz::Error::invalid("body", format!("undecodable message: {e}")))
        })
    }
}
