"""Names with a meaning in the spec: semantic events and the e-commerce events.

Destinations map these to their own operations (a delete API, a native purchase event), so the
names are kept in one place rather than spelled again in every adapter.
"""

from __future__ import annotations

from typing import Literal

from router.events import Event

SemanticAction = Literal["delete", "suppress", "unsuppress"]

SEMANTIC_ACTIONS: dict[str, SemanticAction] = {
    # Customer.io Data Pipelines names, then Segment's.
    "Delete Person": "delete",
    "User Deleted": "delete",
    "Suppress Person": "suppress",
    "User Suppressed": "suppress",
    "Unsuppress Person": "unsuppress",
    "User Unsuppressed": "unsuppress",
}


def semantic_action(event: Event) -> SemanticAction | None:
    """The user-level operation a track event asks for, or None for an ordinary event."""
    if event.type != "track" or not event.event:
        return None
    return SEMANTIC_ACTIONS.get(event.event)


# The mobile spec's device events (Customer.io Data Pipelines): a push token to register for
# the person, or to forget. Not user-level operations, so not in SEMANTIC_ACTIONS: only
# destinations that keep devices act on them.
DEVICE_CREATED_OR_UPDATED = "Device Created or Updated"
DEVICE_DELETED = "Device Deleted"

# Segment's e-commerce spec v2 event names.
PRODUCTS_SEARCHED = "Products Searched"
PRODUCT_LIST_VIEWED = "Product List Viewed"
PRODUCT_LIST_FILTERED = "Product List Filtered"
PROMOTION_VIEWED = "Promotion Viewed"
PROMOTION_CLICKED = "Promotion Clicked"
PRODUCT_CLICKED = "Product Clicked"
PRODUCT_VIEWED = "Product Viewed"
PRODUCT_ADDED = "Product Added"
PRODUCT_REMOVED = "Product Removed"
CART_VIEWED = "Cart Viewed"
CHECKOUT_STARTED = "Checkout Started"
CHECKOUT_STEP_VIEWED = "Checkout Step Viewed"
CHECKOUT_STEP_COMPLETED = "Checkout Step Completed"
PAYMENT_INFO_ENTERED = "Payment Info Entered"
ORDER_UPDATED = "Order Updated"
ORDER_COMPLETED = "Order Completed"
ORDER_REFUNDED = "Order Refunded"
ORDER_CANCELLED = "Order Cancelled"
COUPON_ENTERED = "Coupon Entered"
COUPON_APPLIED = "Coupon Applied"
PRODUCT_ADDED_TO_WISHLIST = "Product Added to Wishlist"
PRODUCT_REMOVED_FROM_WISHLIST = "Product Removed from Wishlist"
PRODUCT_SHARED = "Product Shared"
CART_SHARED = "Cart Shared"
SIGNED_UP = "Signed Up"


def products(event: Event) -> list[dict]:
    """The event's ``products[]`` (only the objects), or the event's own properties as one
    product for single-product events such as Product Added."""
    properties = event.properties
    listed = properties.get("products")
    if isinstance(listed, list):
        return [item for item in listed if isinstance(item, dict)]
    if "product_id" in properties or "sku" in properties:  # not any(): no generator to make
        return [properties]
    return []
