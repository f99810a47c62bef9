//! Clients for QEMU's two JSON line protocols: the QEMU Machine Protocol (QMP), which drives
//! the block layer, and the guest agent, which freezes guest file systems.
//!
//! Both are plain blocking clients: a backup run is one dialogue in a fixed order, so threads
//! or an async runtime would only hide the order. Every read has a deadline, because a QMP
//! socket that already serves another client accepts a second connection but never greets it,
//! and a guest agent that is not running never answers.

mod addr;
mod agent;
mod client;
mod error;
pub mod fuzz;
mod message;
mod stream;

pub use addr::Address;
pub use agent::{Agent, FreezeState};
pub use client::{Qmp, Version};
pub use error::{QmpError, Result};
pub use message::{parse, Event, Message};
