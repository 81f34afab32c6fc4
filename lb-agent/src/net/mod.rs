//! What the agent learns from the host's network configuration: interface addresses and MACs,
//! and the neighbour tables that give backends' MACs.
pub mod addr;
pub mod mac;
pub mod neigh;
