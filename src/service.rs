//! Builds pipelines from a validated config and runs them.
