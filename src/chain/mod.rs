//! Restore-side commands: what `qmprestore` does with images and chains.
