// Where the bytes of a page come from when it is filled: one decision, made in one place
// (page_source()), for the guard-mode fill pipeline and the fault-mode handler alike.
//
// Note [Page source]
// ~~~~~~~~~~~~~~~~~~
// A page of an address space is filled from exactly one of three sources:
//  - spill: the page was written and evicted before (Note [Dirty pages]); its bytes are in the
//    spill store and only there, whatever the layout says. Checked first: a written weight page
//    and a written anonymous page alike must come back as written.
//  - zero: no file extent covers any byte of the page and it was never spilled. That is
//    anonymous memory (Layout::append_anonymous: the range a VmmResource hands out) on its first
//    touch; the fill is a memset, with no read, no host cache slot and nothing counted as read.
//  - checkpoint: the layout's extents, read from the checkpoint's files; the bytes between and
//    after them are zero (the padding of Layout::plan).
// Deciding it here, rather than with ad-hoc checks at each fill, keeps the fault-mode and
// guard-mode fills from disagreeing about a page (a spilled page must never be read from the
// files again, an anonymous one never read at all).
#pragma once

#include <cstdint>

#include "lema/runtime/layout.hpp"
#include "spill_store.hpp"

namespace lema::runtime {

enum class PageSource : std::uint8_t { checkpoint, spill, zero };

/// Note [Page source]. `spill` may be null (pages are not written: nothing is ever spilled).
inline PageSource page_source(const Layout& layout, const SpillStore* spill, PageId page) {
  if (spill != nullptr && spill->holds(page)) return PageSource::spill;
  if (layout.extents(page).empty()) return PageSource::zero;
  return PageSource::checkpoint;
}

}  // namespace lema::runtime
