"""The console in a real headless Chromium: signing in, and the pages an operator opens."""

from __future__ import annotations

from console_kit import screenshot, sign_in
from playwright.async_api import expect


async def test_a_wrong_password_is_refused_and_the_right_one_signs_in(page):
    await sign_in(page, "not the password")
    await expect(page.get_by_role("alert")).to_have_text("Wrong password.")
    await screenshot(page, "sign-in-refused")
    await sign_in(page)
    await expect(page).to_have_url("/console/lines")
    await expect(page.get_by_role("heading", name="Lines", exact=True)).to_be_visible()


async def test_the_lines_page_lists_the_example_personas(page):
    await sign_in(page)
    lines = page.locator("#lines")
    dental = lines.get_by_role("heading", name="Bright Smile Dental front desk")
    await expect(dental).to_be_visible()
    await expect(lines).to_contain_text("+14155550100")
    await expect(lines).to_contain_text("trattoria-luca")
    await page.get_by_role("button", name="Sign out", exact=True).click()
    await expect(page).to_have_url("/console/login")
    await page.goto("/console/lines")
    await expect(page).to_have_url("/console/login?next=/console/lines")
