//! What only the `wsring` programs need, behind the `cli` feature: the bench-protocol
//! handler behind `wsring serve` ([`serve`]), its status page ([`status`]), and the host
//! check behind `wsring check` ([`check`]), and the broker client `--broker` names
//! ([`broker`]). Nothing in the engine or the layers below
//! imports from here.

pub mod broker;
pub mod check;
pub mod serve;
pub mod status;
