//! Virtual networks like libvirt's (issue 22): definitions and the
//! runtime that brings them up ([`runtime`]).

pub mod runtime;
