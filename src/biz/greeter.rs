//! The greeter of the Kratos layout: a smoke test for both transports.

/// Says hello.
#[derive(Debug, Default, Clone)]
pub struct GreeterUsecase;

impl GreeterUsecase {
    /// The greeting for `name`.
    pub fn greet(&self, name: &str) -> String {
        format!("Hello {name}")
    }
}
