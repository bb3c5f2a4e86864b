//! A value that a config reload (SIGHUP) may replace while requests read it.
//!
//! Readers take the current `Arc` (a read lock held for one clone) and keep using it
//! for as long as they need: a request started before a reload finishes with the old
//! value, the next one sees the new.

use std::sync::{Arc, RwLock};

pub struct Live<T: ?Sized>(RwLock<Arc<T>>);

impl<T: ?Sized> Live<T> {
    pub fn new(value: Arc<T>) -> Live<T> {
        Live(RwLock::new(value))
    }

    pub fn get(&self) -> Arc<T> {
        // Replacing is one assignment: a panicking writer cannot leave it half done.
        Arc::clone(&self.0.read().unwrap_or_else(|e| e.into_inner()))
    }

    pub fn set(&self, value: Arc<T>) {
        *self.0.write().unwrap_or_else(|e| e.into_inner()) = value;
    }
}
