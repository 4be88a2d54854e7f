//! Client dialects. Each module owns its routes, its wire types and the one place where
//! its errors become status codes. They all call the same [`crate::server::Node`].

pub mod kv_store;
