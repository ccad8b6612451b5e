//! The load generator (`parley load`): see issue 5. Not built yet.
