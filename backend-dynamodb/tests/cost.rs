//! Cost per message (rewritten below).
