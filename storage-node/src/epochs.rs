//! Windows of items of consecutive map epochs: the maps a node applied,
//! the placements it put into effect.

use std::collections::VecDeque;

/// Appends `next` to `window`, which holds items of consecutive epochs,
/// oldest first: nothing if `next` is not newer than the newest, a window
/// started anew after a skipped epoch, and at most `cap` items.
pub(crate) fn push_consecutive<T>(
    window: &mut VecDeque<T>,
    next: T,
    epoch: impl Fn(&T) -> u64,
    cap: usize,
) {
    let newest = window.back().map(&epoch);
    if newest.is_some_and(|newest| newest >= epoch(&next)) {
        return;
    }
    if newest.is_some_and(|newest| newest + 1 != epoch(&next)) {
        window.clear();
    }
    if window.len() == cap {
        window.pop_front();
    }
    window.push_back(next);
}

#[cfg(test)]
mod tests {
    use super::*;

    fn push(window: &mut VecDeque<u64>, epoch: u64) {
        push_consecutive(window, epoch, |&e| e, 3);
    }

    #[test]
    fn a_window_keeps_the_newest_consecutive_epochs() {
        let mut window = VecDeque::new();
        for epoch in [1, 2, 3, 4, 4, 2] {
            push(&mut window, epoch);
        }
        assert_eq!(window, [2, 3, 4]);
        push(&mut window, 6);
        assert_eq!(window, [6], "a skipped epoch starts it anew");
    }
}
