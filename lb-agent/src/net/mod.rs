//! What the agent learns from the host's network configuration: interface addresses and MACs,
//! the neighbour tables that give backends' MACs, and when routes change.
pub mod addr;
pub mod mac;
pub mod neigh;
pub mod routes;
