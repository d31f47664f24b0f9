//! keelson's pause: the process that holds a pod sandbox's namespaces.
//! It sleeps until SIGTERM/SIGINT and reaps any zombie re-parented to it (PID 1 duty).
//! Built by build.rs as a static binary with no crates: only raw libc symbols.
#![no_main]

use std::ffi::c_int;

unsafe extern "C" {
    fn signal(sig: c_int, handler: usize) -> usize;
    fn pause() -> c_int;
    fn waitpid(pid: c_int, status: *mut c_int, options: c_int) -> c_int;
    fn _exit(code: c_int) -> !;
}

const SIGINT: c_int = 2;
const SIGTERM: c_int = 15;
const SIGCHLD: c_int = 17;
const WNOHANG: c_int = 1;

extern "C" fn on_term(_: c_int) {
    unsafe { _exit(0) }
}

extern "C" fn on_child(_: c_int) {
    let mut status: c_int = 0;
    while unsafe { waitpid(-1, &mut status, WNOHANG) } > 0 {}
}

#[unsafe(no_mangle)]
pub extern "C" fn main(_argc: c_int, _argv: *const *const u8) -> c_int {
    unsafe {
        signal(SIGINT, on_term as usize);
        signal(SIGTERM, on_term as usize);
        signal(SIGCHLD, on_child as usize);
        loop {
            pause();
        }
    }
}
