// QoS1 ordering and de-duplication (PROTOCOL.md section 6.4).

import { describe, expect, it } from "vitest";
import { Inbox } from "../../src/inbox.js";

describe("Inbox", () => {
  it("delivers in order, holds early ones and fills the gap", () => {
    const inbox = new Inbox<number>();
    expect(inbox._offer(1, 1)).toEqual([1]);
    expect(inbox._offer(3, 3)).toEqual([]);
    expect(inbox._offer(4, 4)).toEqual([]);
    expect(inbox._held).toBe(2);
    expect(inbox._offer(2, 2)).toEqual([2, 3, 4]);
    expect(inbox._delivered).toBe(4);
  });

  it("drops duplicates but still makes an ack due", () => {
    const inbox = new Inbox<number>(5);
    expect(inbox._takeAck()).toBeUndefined();
    expect(inbox._offer(5, 5)).toEqual([]);
    expect(inbox._takeAck()).toBe(5);
    expect(inbox._takeAck()).toBeUndefined();
    expect(inbox._offer(7, 7)).toEqual([]);
    expect(inbox._offer(7, 7)).toEqual([]);
    expect(inbox._held).toBe(1);
  });

  it("never acknowledges past a gap", () => {
    const inbox = new Inbox<number>();
    inbox._offer(1, 1);
    inbox._offer(3, 3);
    expect(inbox._takeAck()).toBe(1);
  });

  it("adopts the server's ack point and releases what it unblocks", () => {
    const inbox = new Inbox<number>(2);
    inbox._offer(6, 6);
    inbox._offer(4, 4);
    expect(inbox._ackedByServer(5)).toEqual([6]);
    expect(inbox._delivered).toBe(6);
    expect(inbox._ackedByServer(3)).toEqual([]);
    expect(inbox._offer(6, 6)).toEqual([]);
  });

  it("bounds the hold buffer", () => {
    const inbox = new Inbox<number>(0, 2);
    inbox._offer(3, 3);
    inbox._offer(4, 4);
    inbox._offer(5, 5);
    expect(inbox._held).toBe(2);
    expect(inbox._offer(1, 1)).toEqual([1]);
    expect(inbox._offer(2, 2)).toEqual([2, 3, 4]);
  });
});
