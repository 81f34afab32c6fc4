//! Every limit of the data path, in one place, used by both sides.

/// Distinct VIP addresses.
pub const MAX_VIPS: u32 = 1024;
/// Services (VIP, port, protocol).
pub const MAX_SERVICES: u32 = 1024;
/// Backends over all services (ids are 0..MAX_BACKENDS).
pub const MAX_BACKENDS: u32 = 4096;
/// Default Maglev table size per service: a prime well above 100 × the number of backends
/// a service usually has, as the Maglev paper recommends.
pub const DEFAULT_MAGLEV_SIZE: u32 = 65_537;
/// Largest Maglev table size a service may ask for.
pub const MAX_MAGLEV_SIZE: u32 = 655_373;
/// Entries of the MAGLEV map when the config does not say: room for eight services of the
/// default size, each with its two copies (active and inactive).
pub const DEFAULT_MAGLEV_CAPACITY: u32 = 16 * DEFAULT_MAGLEV_SIZE;
