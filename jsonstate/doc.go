// Package jsonstate provides ready-made orchestrator.ReactorState
// implementations for the common layout "one JSON document per etcd key".
//
// State[T] mirrors every key directly or indirectly under a prefix, e.g.
// "/app/nodes/a", "/app/nodes/b" under "/app/nodes", each decoded into a T and
// addressed by its name (the part after prefix + "/": "a", "b"). Doc[T]
// mirrors a single key, e.g. "/app/config". Both ignore every other key, so
// several of them can share one worker through Multi.
//
// Reads (Get, Range, Len, ...) see the snapshot the worker passes to Tick.
// Writes never change the in-memory state directly: Patch, Put, Delete and
// DeleteIf queue orchestrator.DataPatch values that the worker runs at commit
// time on the current etcd values and re-runs on newer ones after a
// conflict. A PatchFunc therefore gets its own freshly decoded copy of the
// document each time it runs and must be pure. Group (or QueueGroup) queues
// several changes that commit atomically, all or nothing.
//
// # Conditional groups
//
// A group commits only the keys it writes as compare-and-swap; documents it
// merely reads are not compared. To write "only if that document still
// says so", add the condition to the group with Group.Require (one document)
// or Group.RequireAll (every document of the state), or with the RequireOps
// of another State or Doc. The condition runs at commit time on the current
// documents, a false answer skips the whole group, and the group depends on
// what the condition read: a concurrent change to it makes the commit fail
// and the group, condition included, run again on the new values. Checking
// the condition in Tick instead is not safe under contention.
//
// # Decode errors
//
// A value that is not valid JSON for T (including an empty value) is a
// *DecodeError, which matches ErrDecode with errors.Is and exposes the
// decoder's error with errors.As. What Update does with it is the
// DecodePolicy (WithDecodePolicy):
//
//   - FailOnInvalid (default): Update returns the error, so the worker stops
//     and Run returns it wrapped. Nothing is silently ignored.
//   - SkipInvalid: the document is treated as absent and the error is kept
//     (State.Errors, Doc.Err) until the key is rewritten with a valid value or
//     deleted.
//
// Under both policies a patch that has to read a document that does not
// decode (Patch, DeleteIf) fails with a *DecodeError, which stops the worker;
// Put and Delete do not read the old value and can replace a broken document.
//
// None of the types is safe for concurrent use; the worker calls Update and
// Tick from one goroutine.
package jsonstate
