//! epoll items registered through an fd that was closed later (the epoll
//! still watches the file, held by a dup), one whose number stays free and
//! one whose number was reused for another file
//! (tests/programs/epoll_closed.c checks both still report events, and the
//! fd numbers are as it left them): the standard cycle.
mod common;
use common::*;

#[test]
fn epoll_items_through_closed_fds_still_report_events() {
    let c = Cycle::new(program("epoll_closed"), &["-t", "50"]);
    standard_cycle("epoll_closed", &c);
}
