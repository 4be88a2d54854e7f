//! Client dialects. Each module owns its routes, its wire types and the one place where
//! its errors become status codes. They all call the same [`crate::server::Node`], and
//! all admit their requests through the one gate of [`body`] (bodies read under a size
//! limit, a deadline and a memory budget, then a node-wide in-flight limit).

pub mod body;
pub mod kv_store;
