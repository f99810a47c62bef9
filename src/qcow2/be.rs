//! Big-endian on-disk layouts, declared once: a structure lists each field with its type and
//! byte offset, and both its parser and its serialiser are generated from that one list, so
//! the two can never disagree about where a field lies.
//!
//! [`be_struct!`] declares a structure all of whose fields are on disk; [`be_fields!`] gives
//! an existing structure a reader and a writer for the on-disk fields among its own (the
//! header, whose fields come in version-dependent groups). Callers check the buffer is long
//! enough first: the validation of lengths belongs to the structure's own parser.

/// A big-endian integer field.
pub trait Be: Copy {
    const SIZE: usize;
    fn get(b: &[u8], off: usize) -> Self;
    fn put(self, b: &mut [u8], off: usize);
}

macro_rules! be_int {
    ($($t:ty),*) => {$(
        impl Be for $t {
            const SIZE: usize = std::mem::size_of::<$t>();
            fn get(b: &[u8], off: usize) -> $t {
                <$t>::from_be_bytes(b[off..off + Self::SIZE].try_into().expect("sized slice"))
            }
            fn put(self, b: &mut [u8], off: usize) {
                b[off..off + Self::SIZE].copy_from_slice(&self.to_be_bytes());
            }
        }
    )*};
}
be_int!(u8, u16, u32, u64);

/// Declares a structure of on-disk fields: `LEN` (its length on disk), `read` and `write`.
macro_rules! be_struct {
    ($(#[$m:meta])* pub struct $name:ident ($len:expr) {
        $($(#[$fm:meta])* $field:ident: $ty:ty = $off:expr),* $(,)?
    }) => {
        $(#[$m])*
        #[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
        pub struct $name {
            $($(#[$fm])* pub $field: $ty),*
        }

        // Every field lies within the declared length.
        $(
            #[allow(clippy::int_plus_one)]
            const _: () = assert!($off + std::mem::size_of::<$ty>() <= $len);
        )*

        impl $name {
            pub const LEN: usize = $len;

            /// Reads the fields from `b` (at least `LEN` bytes).
            pub fn read(b: &[u8]) -> $name {
                use $crate::qcow2::be::Be;
                $name { $($field: <$ty>::get(b, $off)),* }
            }

            /// Writes the fields into `b` (at least `LEN` bytes).
            pub fn write(&self, b: &mut [u8]) {
                use $crate::qcow2::be::Be;
                $(self.$field.put(b, $off);)*
            }

            /// The `LEN` bytes on disk.
            pub fn to_bytes(self) -> Vec<u8> {
                let mut b = vec![0u8; $len];
                self.write(&mut b);
                b
            }
        }
    };
}
pub(crate) use be_struct;

/// Gives an existing structure a reader and a writer for some of its fields.
macro_rules! be_fields {
    ($ty:ty, $read:ident, $write:ident { $($field:ident: $fty:ty = $off:expr),* $(,)? }) => {
        impl $ty {
            fn $read(&mut self, b: &[u8]) {
                use $crate::qcow2::be::Be;
                $(self.$field = <$fty>::get(b, $off);)*
            }

            fn $write(&self, b: &mut [u8]) {
                use $crate::qcow2::be::Be;
                $(<$fty>::put(self.$field, b, $off);)*
            }
        }
    };
}
pub(crate) use be_fields;

#[cfg(test)]
mod tests {
    be_struct! {
        /// A test layout.
        pub struct Sample(15) {
            a: u8 = 0, b: u16 = 1, c: u32 = 3,
            d: u64 = 7,
        }
    }

    #[test]
    fn fields_round_trip_big_endian() {
        let s = Sample {
            a: 1,
            b: 0x0203,
            c: 0x0405_0607,
            d: 0x0809_0a0b_0c0d_0e0f,
        };
        let b = s.to_bytes();
        assert_eq!(b.len(), Sample::LEN);
        assert_eq!(b, (1..=15).collect::<Vec<u8>>());
        assert_eq!(Sample::read(&b), s);
    }
}
