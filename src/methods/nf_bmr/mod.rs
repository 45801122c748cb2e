//! NF-BMR (being written).
