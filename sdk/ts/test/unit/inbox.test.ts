// QoS1 ordering and de-duplication (PROTOCOL.md section 6.4).

import { describe, expect, it } from "vitest";
import { Inbox } from "../../src/inbox.js";

describe("Inbox", () => {
  it("delivers in order, holds early ones and fills the gap", () => {
    const inbox = new Inbox<number>();
    expect(inbox.offer(1, 1)).toEqual([1]);
    expect(inbox.offer(3, 3)).toEqual([]);
    expect(inbox.offer(4, 4)).toEqual([]);
    expect(inbox.held).toBe(2);
    expect(inbox.offer(2, 2)).toEqual([2, 3, 4]);
    expect(inbox.delivered).toBe(4);
  });

  it("drops duplicates but still makes an ack due", () => {
    const inbox = new Inbox<number>(5);
    expect(inbox.takeAck()).toBeUndefined();
    expect(inbox.offer(5, 5)).toEqual([]);
    expect(inbox.takeAck()).toBe(5);
    expect(inbox.takeAck()).toBeUndefined();
    expect(inbox.offer(7, 7)).toEqual([]);
    expect(inbox.offer(7, 7)).toEqual([]);
    expect(inbox.held).toBe(1);
  });

  it("never acknowledges past a gap", () => {
    const inbox = new Inbox<number>();
    inbox.offer(1, 1);
    inbox.offer(3, 3);
    expect(inbox.takeAck()).toBe(1);
  });

  it("adopts the server's ack point and releases what it unblocks", () => {
    const inbox = new Inbox<number>(2);
    inbox.offer(6, 6);
    inbox.offer(4, 4);
    expect(inbox.ackedByServer(5)).toEqual([6]);
    expect(inbox.delivered).toBe(6);
    expect(inbox.ackedByServer(3)).toEqual([]);
    expect(inbox.offer(6, 6)).toEqual([]);
  });

  it("bounds the hold buffer", () => {
    const inbox = new Inbox<number>(0, 2);
    inbox.offer(3, 3);
    inbox.offer(4, 4);
    inbox.offer(5, 5);
    expect(inbox.held).toBe(2);
    expect(inbox.offer(1, 1)).toEqual([1]);
    expect(inbox.offer(2, 2)).toEqual([2, 3, 4]);
  });
});
