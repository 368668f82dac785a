//! Keyset pages: the page size a request may ask for, and where the next page starts.

use super::Error;

/// Page size when the request names none.
pub const DEFAULT_PAGE_SIZE: u32 = 50;
/// Largest page a client may ask for.
pub const MAX_PAGE_SIZE: u32 = 1000;

/// The page size a request asked for: 0 means [`DEFAULT_PAGE_SIZE`].
///
/// # Errors
/// `InvalidPageSize` outside `0..=MAX_PAGE_SIZE`.
pub fn page_limit(page_size: i64) -> Result<u32, Error> {
    match u32::try_from(page_size) {
        Ok(0) => Ok(DEFAULT_PAGE_SIZE),
        Ok(n) if n <= MAX_PAGE_SIZE => Ok(n),
        _ => Err(Error::InvalidPageSize { page_size, max: MAX_PAGE_SIZE }),
    }
}

/// Splits up to `size + 1` rows read for a page of `size` into the page and the key the
/// next page starts after, if there is a next page.
pub fn split_page<T, K>(mut rows: Vec<T>, size: u32, key: impl Fn(&T) -> K) -> (Vec<T>, Option<K>) {
    if rows.len() > size as usize {
        rows.truncate(size as usize);
        let next = rows.last().map(key);
        (rows, next)
    } else {
        (rows, None)
    }
}
