//! caskade-node: a caskade storage node.
//!
//! [`engine`] is the Bitcask storage engine: append-only data files, an
//! in-memory ordered keydir, hint files and background merge. It does no
//! networking; the node's services reach it only through [`engine::Engine`].

pub mod engine;
