//! One module per noun, one function per verb.

pub mod client_cert;
pub mod confine;
pub mod cluster;
pub mod data;
pub mod node;
pub mod service;
pub mod image;
pub mod mount;
pub mod volume;
pub mod images;
pub mod network;
pub mod run;
pub mod stack;
