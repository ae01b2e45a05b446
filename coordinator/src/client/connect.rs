//! The public API's client: a channel to the server, with the API key on every call.

use anyhow::Context;
use yoco_proto::v1::generation_client::GenerationClient;

use crate::api::MAX_MESSAGE_BYTES;

/// Adds the API key to every call.
#[derive(Clone)]
pub struct Auth(Option<tonic::metadata::MetadataValue<tonic::metadata::Ascii>>);

impl tonic::service::Interceptor for Auth {
    fn call(&mut self, mut req: tonic::Request<()>) -> Result<tonic::Request<()>, tonic::Status> {
        if let Some(v) = &self.0 {
            req.metadata_mut().insert("authorization", v.clone());
        }
        Ok(req)
    }
}

/// The public API's client, with the API key.
pub type Client = GenerationClient<tonic::service::interceptor::InterceptedService<tonic::transport::Channel, Auth>>;

/// A client on `channel`, sending `api_key` (if any) as `authorization: Bearer <key>`.
pub fn client(channel: tonic::transport::Channel, api_key: Option<&str>) -> anyhow::Result<Client> {
    let auth = match api_key {
        Some(k) => Some(format!("Bearer {k}").parse().context("--api-key: not a valid header value")?),
        None => None,
    };
    Ok(GenerationClient::with_interceptor(channel, Auth(auth))
        .max_decoding_message_size(MAX_MESSAGE_BYTES)
        .max_encoding_message_size(MAX_MESSAGE_BYTES))
}
